"""Recompute every measurement a published version states, from its published files alone.

    .venv/bin/python bench/recompute_measurements.py ROOT/NAME/vN [...]

Reads only the version folder: ``manifest.json``, ``samples.parquet`` and each sample's image, label and instance
files (PNG or NIfTI, decoded as any user would: PNG pixels, HU = value - 1024 for ``hu16``; NIfTI voxels and the
header's affine and spacing). For each finding of each sample it recomputes the ``measured`` fields, the ``bboxes``
column and the numeric value of every QC check, and compares them with what the index publishes within the
tolerances in ``TOLERANCES`` (exact for counts, boxes, categories and lobes; the rounding of the stored value for
sizes, areas and centroids; a stated margin for quantities read from the image, which carries the watermark and
the integer quantisation the measurement did not see). Placement details a measurement needs (a finding's centre,
requested region and size) are read from the published ``requested`` column.

The geometry helpers are the annotators' own (``annotators.ct``, ``annotators.surface``, ``annotators.ct_volume``):
what is checked is that their inputs are all published, and that the published numbers are what they give.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Absolute tolerances: (stored rounding or a stated margin). Image-derived values carry the watermark and the codec's
# integer rounding. A median moves by at most the largest change of any pixel: the watermark's 14 HU (scheme v3,
# store.watermark.CT_AMPLITUDE_HU; measured shifts are 0-4 HU) plus 0.5 HU of rounding.
TOLERANCES = {"geometry": 1e-3, "centroid": 2e-3, "fraction": 1e-5, "cnr_rel": 0.10, "contrast_rel": 0.10,
              "median_hu": 14.5}


@dataclass
class Report:
    version: str
    compared: int = 0
    mismatches: list[str] = field(default_factory=list)
    columns: set[str] = field(default_factory=set)

    def check(self, where: str, col: str, published: Any, recomputed: Any, tol: float = 0.0, rel: bool = False):
        self.compared += 1
        self.columns.add(col)
        if isinstance(published, (int, float)) and isinstance(recomputed, (int, float)) and \
                not isinstance(published, bool):
            bound = tol * max(abs(float(published)), 1.0) if rel else tol
            ok = abs(float(published) - float(recomputed)) <= bound + 1e-12
        else:
            ok = published == recomputed
        if not ok:
            self.mismatches.append(f"{where} {col}: published {published!r}, recomputed {recomputed!r}")


# ------------------------------------------------------------------------------------------------ reading files
def _read_png(path: Path) -> np.ndarray:
    import cv2

    a = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
    if a is None:
        raise ValueError(f"{path} is not a readable PNG")
    return a[..., ::-1] if a.ndim == 3 else a


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(array [k, j, i], RAS affine) as nibabel reads the file."""
    import nibabel as nib

    img = nib.Nifti1Image.from_bytes(gzip.decompress(path.read_bytes()))
    return np.asarray(img.dataobj).transpose(2, 1, 0), np.asarray(img.affine, float)


def _finding_extra(f: dict) -> dict:
    return json.loads(f["extra"]) if f.get("extra") else {}


def _flat(f: dict) -> dict:
    """A published FINDING struct as the dict the annotator wrote (``extra`` merged back)."""
    out = {k: v for k, v in f.items() if k != "extra" and v is not None}
    out.update(_finding_extra(f))
    return out


def _row_records(row: dict) -> tuple[str, dict[int, dict], dict[str, float | None], dict[int, dict]]:
    """(sample id, requested findings by instance, QC check values by name, published boxes by instance)."""
    return (row["sample_id"], {f["instance"]: _flat(f) for f in row["requested"] or []},
            {c["name"]: c["value"] for c in (row["qc"] or {}).get("checks") or []},
            {b["instance"]: b for b in row["bboxes"] or []})


# ------------------------------------------------------------------------------------------------ chest CT (2D)
def recompute_chest_ct(rep: Report, row: dict, image_u16: np.ndarray, label: np.ndarray, instance: np.ndarray):
    from annotators.ct import (C, LOBE_BY_ID, LOBES, LUNG_IDS, NODULE_IDS, SIDE_LOBES, class_histograms,
                               connected_findings, contrast_to_noise, feret_axes, histogram_median,
                               lung_rads_size_category, ring_lobe_counts, HU_CHECK_RANGES, MIN_PIXELS)

    image = image_u16.astype(np.float32) - 1024.0  # hu16: HU + 1024
    sp = float(row["pixel_spacing_mm"])
    h, w = label.shape
    sid, req, checks, boxes = _row_records(row)
    rep.check(sid, "qc.finding_count", checks.get("finding_count"), float(connected_findings(label)))
    hist = class_histograms(image, label)
    for name in HU_CHECK_RANGES:
        rows_ = hist[LUNG_IDS].sum(0) if name == "lung" else hist[C[name]]
        key = f"median_hu_{name}"
        if rows_.sum() >= MIN_PIXELS or key in checks:
            rep.check(sid, f"qc.{key}", checks.get(key), histogram_median(rows_), TOLERANCES["median_hu"])
    for f in row["measured"] or []:
        pub = _flat(f)
        k = pub["instance"]
        where = f"{sid} finding {k}"
        full = instance == k
        ys, xs = np.nonzero(full)
        rep.check(where, "area_px", pub.get("area_px"), int(full.sum()))
        if not len(ys):
            continue
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        m = full[y0:y1, x0:x1]
        lab = label[y0:y1, x0:x1]
        has_solid, has_gg = bool((lab[m] == C["nodule_solid"]).any()), bool((lab[m] == C["nodule_ground_glass"]).any())
        kind = "part_solid" if has_solid and has_gg else "solid" if has_solid else "ground_glass"
        rep.check(where, "kind", pub["kind"], kind)
        rep.check(where, "margin", pub.get("margin"), req[k].get("margin"))
        area = int(m.sum())
        long_px, short_px = feret_axes(m)
        sp2 = sp * sp
        rep.check(where, "area_mm2", pub["area_mm2"], round(area * sp2, 4), TOLERANCES["geometry"])
        eq = 2 * math.sqrt(area / math.pi) * sp
        rep.check(where, "equivalent_diameter_mm", pub["equivalent_diameter_mm"], eq, TOLERANCES["geometry"])
        rep.check(where, "long_axis_mm", pub["long_axis_mm"], long_px * sp, TOLERANCES["geometry"])
        rep.check(where, "short_axis_mm", pub["short_axis_mm"], short_px * sp, TOLERANCES["geometry"])
        mean_axis = (long_px + short_px) / 2 * sp
        rep.check(where, "mean_axis_mm", pub["mean_axis_mm"], mean_axis, TOLERANCES["geometry"])
        solid_mean = None
        if kind == "part_solid":
            sl, ss = feret_axes(m & (lab == C["nodule_solid"]))
            solid_mean = (sl + ss) / 2 * sp
            rep.check(where, "solid_mean_axis_mm", pub.get("solid_mean_axis_mm"), solid_mean, TOLERANCES["geometry"])
        rep.check(where, "centroid_px", pub["centroid_px"], [round(float(xs.mean()), 3), round(float(ys.mean()), 3)])
        rep.check(where, "centroid_mm", pub["centroid_mm"], [round((float(xs.mean()) + 0.5 - w / 2) * sp, 3),
                                                             round((float(ys.mean()) + 0.5 - h / 2) * sp, 3)])
        counts = ring_lobe_counts(label, m.astype(np.uint8), int(y0), int(x0), sp)
        lung_total = int(counts[LUNG_IDS].sum())
        lobe_id = int(LUNG_IDS[int(np.argmax(counts[LUNG_IDS]))]) if lung_total else 0
        want = req[k].get("requested_location") or req[k].get("location") or "any"
        want_ids = LUNG_IDS if want == "any" else [LOBES[n] for n in SIDE_LOBES[want]] if want in SIDE_LOBES \
            else [LOBES[want]]
        in_region = float(counts[want_ids].sum() / lung_total) if lung_total else 0.0
        rep.check(where, "lobe", pub.get("lobe"), LOBE_BY_ID.get(lobe_id, "none"))
        rep.check(where, "in_region_fraction", pub["in_region_fraction"], in_region, TOLERANCES["fraction"])
        rep.check(where, "lung_rads_size_category", pub.get("lung_rads_size_category"),
                  lung_rads_size_category(kind, mean_axis, solid_mean))
        box = [int(x0), int(y0), int(x1), int(y1)]
        rep.check(where, "bbox_px", pub.get("bbox_px"), box)
        b = boxes.get(k)
        rep.check(where, "bboxes", [b[c] for c in ("x0", "y0", "x1", "y1")] if b else None, box)
        cnr = contrast_to_noise(image, instance, label, {"instance": k, "center_px": req[k]["center_px"],
                                                         "shape": req[k]["shape"]}, sp)
        rep.check(where, "cnr", pub.get("cnr"), cnr, TOLERANCES["cnr_rel"], rel=True)
        rep.check(where, f"qc.size_{k}", checks.get(f"size_{k}"), abs(eq - float(req[k]["diameter_mm"])),
                  TOLERANCES["geometry"])
        rep.check(where, f"qc.in_lobe_{k}", checks.get(f"in_lobe_{k}"), in_region, TOLERANCES["fraction"])
        rep.check(where, f"qc.visible_{k}", checks.get(f"visible_{k}"), cnr, TOLERANCES["cnr_rel"], rel=True)


# ------------------------------------------------------------------------------------------------ surface
def recompute_surface(rep: Report, row: dict, image: np.ndarray, label: np.ndarray, instance: np.ndarray):
    from annotators.surface import (_edge_of, defect_contrast, instance_boxes, measure_line)
    from schemas.surface import DEFECT_CLASS, OUTSIDE_PART, part_box, region_box

    sp = float(row["pixel_spacing_mm"])
    h, w = label.shape
    sid, req, checks, boxes = _row_records(row)
    on_part = label != OUTSIDE_PART
    pbox = part_box(on_part if not on_part.all() else None, (h, w))
    ring_px = max(3, int(round(0.5 / sp)))
    objs = instance_boxes(instance)
    if not row["measured"]:
        rep.check(sid, "qc.empty_mask", checks.get("empty_mask"),
                  float(((label > 0) & (label != OUTSIDE_PART)).sum()))
    for f in row["measured"] or []:
        pub = _flat(f)
        k = pub["instance"]
        where = f"{sid} defect {k}"
        want = req[k]
        sl = objs[k - 1] if k - 1 < len(objs) else None
        if sl is None:
            rep.check(where, "area_mm2", pub.get("area_mm2"), 0.0)
            continue
        pad = ring_px + 2
        csl = tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(sl, (h, w)))
        inst = instance[csl]
        m = inst == k
        ys, xs = np.nonzero(m)
        classes = set(np.unique(label[csl][m]).tolist())
        rep.check(where, "kind (label class)", classes, {DEFECT_CLASS[pub["kind"]]})
        rep.check(where, "region", pub.get("region"), want.get("region"))
        rep.check(where, "area_mm2", pub["area_mm2"], len(ys) * sp * sp, 1e-5)
        rep.check(where, "centroid_mm", pub["centroid_mm"], [round(float((xs.mean() + csl[1].start + 0.5) * sp), 4),
                                                             round(float((ys.mean() + csl[0].start + 0.5) * sp), 4)])
        rec: dict[str, float] = {}
        if pub["kind"] in ("scratch", "crack"):
            ml = measure_line(m[ys.min():ys.max() + 1, xs.min():xs.max() + 1], simplify=pub["kind"] == "scratch")
            rec = {"length_mm": ml["length_px"] * sp, "width_mm": ml["width_px"] * sp}
            rep.check(where, "orientation_deg", pub.get("orientation_deg"), ml["chord_angle_deg"], 0.005)
        elif pub["kind"] == "missing_material":
            edge = _edge_of(want.get("region")) or "top_edge"
            along = edge in ("top_edge", "bottom_edge")
            n_cols, n_rows = int(m.any(axis=0).sum()), int(m.any(axis=1).sum())
            rec = {"length_mm": (n_cols if along else n_rows) * sp, "width_mm": (n_rows if along else n_cols) * sp}
        else:
            rec = {"diameter_mm": 2 * np.sqrt(len(ys) / np.pi) * sp}
        for q, v in rec.items():
            rep.check(where, q, pub.get(q), v, 1e-4)
        extent = want.get("length_mm") or want.get("diameter_mm") or 0.0
        ry0, rx0, ry1, rx1 = region_box(want.get("region", want.get("location", "any")), pbox, sp, extent)
        gy, gx = ys + csl[0].start, xs + csl[1].start
        inside = (gy >= ry0) & (gy < ry1) & (gx >= rx0) & (gx < rx1) & on_part[gy, gx]
        rep.check(where, "in_region_fraction", pub["in_region_fraction"], float(inside.mean()), 1e-5)
        ring_ok = (inst == 0) & on_part[csl]
        contrast = defect_contrast(image[csl], m, ring_ok, ring_px)
        rep.check(where, "contrast", pub.get("contrast"), contrast, TOLERANCES["contrast_rel"], rel=True)
        b = boxes.get(k)
        rep.check(where, "bboxes", [b[c] for c in ("x0", "y0", "x1", "y1")] if b else None,
                  [int(gx.min()), int(gy.min()), int(gx.max()) + 1, int(gy.max()) + 1])
        errs = [abs(rec[q] - float(want[q])) for q in ("length_mm", "width_mm", "diameter_mm") if q in want and q in rec]
        rep.check(where, f"qc.size:{k}", checks.get(f"size:{k}"), max(errs) if errs else 0.0, 2e-4)
        rep.check(where, f"qc.in_region:{k}", checks.get(f"in_region:{k}"), float(inside.mean()), 1e-5)
        rep.check(where, f"qc.contrast:{k}", checks.get(f"contrast:{k}"), contrast, TOLERANCES["contrast_rel"],
                  rel=True)


# ------------------------------------------------------------------------------------------------ chest CT volume
def recompute_chest_ct_volume(rep: Report, row: dict, image: np.ndarray, label: np.ndarray, instance: np.ndarray,
                              affine: np.ndarray):
    from types import SimpleNamespace

    from annotators.ct_volume import (HU_CHECK_RANGES, LOBE_BY_ID, LUNG_IDS, MIN_SAMPLED_VOXELS, V, _median_from_hist,
                                      connected_findings_3d, contrast_to_noise_3d, label_lobe_measures,
                                      lung_rads_axes, lung_rads_category, sampled_histograms)

    sid, req, checks, boxes = _row_records(row)
    spacing = tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(0)))[::-1]  # (sz, sy, sx)
    voxel = spacing[0] * spacing[1] * spacing[2]
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # NIfTI RAS -> DICOM LPS
    rep.check(sid, "qc.finding_count", checks.get("finding_count"), float(connected_findings_3d(label)))
    hist = sampled_histograms(image, label)
    for name in HU_CHECK_RANGES:
        rows_ = hist[LUNG_IDS].sum(0) if name == "lung" else hist[V[name]]
        key = f"median_hu_{name}"
        if rows_.sum() >= MIN_SAMPLED_VOXELS or key in checks:
            rep.check(sid, f"qc.{key}", checks.get(key), _median_from_hist(rows_), TOLERANCES["median_hu"])
    for f in row["measured"] or []:
        pub = _flat(f)
        k = pub["instance"]
        where = f"{sid} finding {k}"
        full = instance == k
        n = int(full.sum())
        rep.check(where, "voxels", pub.get("voxels"), n)
        cnr = contrast_to_noise_3d(image, instance, label, {"instance": k, "box": req[k]["box"]},
                                   SimpleNamespace(spacing=spacing))
        rep.check(where, "cnr", pub.get("cnr"), cnr, TOLERANCES["cnr_rel"], rel=True)
        rep.check(where, f"qc.visible_{k}", checks.get(f"visible_{k}"), cnr, TOLERANCES["cnr_rel"], rel=True)
        if not n:
            continue
        zz, yy, xx = np.nonzero(full)
        z0, y0, x0 = zz.min(), yy.min(), xx.min()
        box = (slice(z0, zz.max() + 1), slice(y0, yy.max() + 1), slice(x0, xx.max() + 1))
        m = full[box]
        lab = label[box]
        has_solid, has_gg = bool((lab[m] == V["nodule_solid"]).any()), bool((lab[m] == V["nodule_ground_glass"]).any())
        kind = "part_solid" if has_solid and has_gg else "solid" if has_solid else "ground_glass"
        want = req[k]
        rep.check(where, "kind", pub["kind"], kind)
        rep.check(where, "margin", pub.get("margin"), want.get("margin", "smooth"))
        vol = n * voxel
        rep.check(where, "volume_mm3", pub["volume_mm3"], round(vol))
        rep.check(where, "volume_mm3_exact", pub["volume_mm3_exact"], vol, TOLERANCES["geometry"])
        rep.check(where, "equivalent_diameter_mm", pub["equivalent_diameter_mm"], (6 * vol / math.pi) ** (1 / 3),
                  TOLERANCES["geometry"])
        ax = lung_rads_axes(m, spacing)
        for q in ("long_axis_mm", "short_axis_mm", "mean_diameter_mm", "plane"):
            rep.check(where, q, pub.get(q), ax[q])
        solid = None
        if kind == "part_solid":
            core = m & (lab == V["nodule_solid"])
            solid = lung_rads_axes(core, spacing)
            rep.check(where, "solid_mean_diameter_mm", pub.get("solid_mean_diameter_mm"), solid["mean_diameter_mm"])
            rep.check(where, "solid_volume_mm3", pub.get("solid_volume_mm3"), round(float(core.sum() * voxel)))
        c = np.array([xx.mean(), yy.mean(), zz.mean()])
        rep.check(where, "centroid_ijk", pub["centroid_ijk"], [round(float(v), 3) for v in c])
        p = lps @ np.array([*c, 1.0])
        rep.check(where, "centroid_lps_mm", pub["centroid_lps_mm"], [round(float(v), 3) for v in p[:3]])
        lobe_name = want.get("location", "any")
        lm = label_lobe_measures(label, full, spacing, lobe_name, want.get("lobe_id"))
        for q in ("lobe", "in_lobe_fraction", "shell_in_lobe_fraction", "touches_pleura", "touches_fissure"):
            rep.check(where, q, pub.get(q), lm[q], TOLERANCES["fraction"] if "fraction" in q else 0.0)
        rep.check(where, "lung_rads", pub.get("lung_rads"),
                  lung_rads_category(kind, ax["mean_diameter_mm"], None if solid is None else solid["mean_diameter_mm"],
                                     bool(want.get("juxtapleural")), want.get("margin", "smooth")))
        bb = [int(x0), int(y0), int(z0), int(xx.max()) + 1, int(yy.max()) + 1, int(zz.max()) + 1]
        rep.check(where, "bbox_ijk", pub.get("bbox_ijk"), bb)
        b = boxes.get(k)
        rep.check(where, "bboxes", [b[q] for q in ("x0", "y0", "x1", "y1")] if b else None, [bb[0], bb[1], bb[3], bb[4]])
        want_d = (6 * want["volume_mm3"] / math.pi) ** (1 / 3) if want.get("volume_mm3") else float(want["diameter_mm"])
        rep.check(where, f"qc.size_{k}", checks.get(f"size_{k}"),
                  round(abs((6 * vol / math.pi) ** (1 / 3) - want_d), 4), TOLERANCES["geometry"])
        rep.check(where, f"qc.in_lobe_{k}", checks.get(f"in_lobe_{k}"), lm["in_lobe_fraction"], TOLERANCES["fraction"])
        if f"off_pleura_fissure_{k}" in checks:
            rep.check(where, f"qc.off_pleura_fissure_{k}", checks.get(f"off_pleura_fissure_{k}"),
                      float(int(lm["touches_pleura"]) + 2 * int(lm["touches_fissure"])))
        rep.check(where, "lobe (name)", pub.get("lobe") in LOBE_BY_ID.values(), True)


# ------------------------------------------------------------------------------------------------ a version
def recompute_version(folder: str | Path) -> Report:
    import pyarrow.parquet as pq

    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = pq.read_table(io.BytesIO((folder / "samples.parquet").read_bytes())).to_pylist()
    rep = Report(f"{manifest['name']}@v{manifest['version']}")
    for row in rows:
        dom = row["domain"]
        if row["image_path"].endswith(".nii.gz"):
            image, affine = _read_nifti(folder / row["image_path"])
            label, _ = _read_nifti(folder / row["label_path"])
            instance, _ = _read_nifti(folder / row["instance_path"])
            recompute_chest_ct_volume(rep, row, image.astype(np.float32), label.astype(np.uint8),
                                      instance.astype(np.int32), affine)
            continue
        image = _read_png(folder / row["image_path"])
        label = _read_png(folder / row["label_path"])
        instance = _read_png(folder / row["instance_path"])
        rep.check(row["sample_id"], "width/height", (row["width"], row["height"]), (image.shape[1], image.shape[0]))
        if dom == "chest_ct":
            recompute_chest_ct(rep, row, image, label, instance)
        elif dom == "surface":
            recompute_surface(rep, row, image, label, instance)
        else:
            rep.mismatches.append(f"{row['sample_id']}: no recomputation for domain {dom!r}")
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", help="version folders (ROOT/NAME/vN)")
    args = ap.parse_args(argv)
    bad = 0
    for f in args.folders:
        rep = recompute_version(f)
        print(f"{rep.version}: {rep.compared} values in {len(rep.columns)} columns recomputed, "
              f"{len(rep.mismatches)} mismatches")
        for m in rep.mismatches[:30]:
            print("  MISMATCH", m)
        bad += len(rep.mismatches)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
