"""Chest-CT volume measurements from the 3D label, Lung-RADS v2022 size rules, and per-volume QC.

Lung-RADS v2022 (ACR; Christensen et al., CHEST 2024;165(3):738-753): measure on lung windows; the mean
diameter is the average of the long axis and the short axis perpendicular to it on the same image, each to
0.1 mm; the axes may be measured in any plane (axial, coronal or sagittal) to reflect the true size, so here
the long axis is the largest over all three plane orientations and the short axis is taken on that image.
Volumes are reported to the nearest mm3. Part-solid nodules are categorised by the solid component's mean
diameter.
"""
from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

from schemas.classes import LOBES
from schemas.volume import VOLUME_IDS, VolumeGeometry
from schemas.volume_contact import shell_contact

V = VOLUME_IDS
LOBE_BY_ID = {v: k for k, v in LOBES.items()}
LUNG_IDS = list(LOBES.values())

HU_CHECK_RANGES: dict[str, tuple[float, float]] = {
    "lung": (-950.0, -700.0), "subcutaneous_fat": (-150.0, -50.0), "muscle": (0.0, 100.0), "heart": (0.0, 100.0),
    "great_vessel": (0.0, 100.0), "cancellous_bone": (100.0, 600.0), "liver": (20.0, 100.0),
}
MIN_SAMPLED_VOXELS = 200  # a class's HU median is checked only with this many voxels in the every-2nd-voxel sample



def sampled_histograms(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """(256 classes, 4096 HU bins from -1024) counts over every 2nd voxel per axis: what the HU-median checks read."""
    sub_l = label[::2, ::2, ::2].astype(np.int32).ravel()
    sub_i = np.clip(image[::2, ::2, ::2].astype(np.int32) + 1024, 0, 4095).ravel()
    return np.bincount(sub_l * 4096 + sub_i, minlength=256 * 4096).reshape(256, 4096)

def feret_axes_mm(mask2d: np.ndarray, sp_row: float, sp_col: float) -> tuple[float, float]:
    """Long axis (max Feret over pixel corners) and the largest width perpendicular to it, in mm."""
    rows, cols = np.nonzero(mask2d)
    if len(rows) == 0:
        return 0.0, 0.0
    pts = np.stack([cols, rows], 1).astype(np.float32)
    corners = (pts[:, None, :] + np.array([[-.5, -.5], [.5, -.5], [-.5, .5], [.5, .5]], np.float32)[None]).reshape(-1, 2)
    corners *= np.array([sp_col, sp_row], np.float32)
    hull = cv2.convexHull(corners).reshape(-1, 2).astype(np.float64)
    d = hull[:, None, :] - hull[None, :, :]
    d2 = (d ** 2).sum(-1)
    i, j = np.unravel_index(np.argmax(d2), d2.shape)
    long_ax = math.sqrt(d2[i, j])
    if long_ax == 0:
        return 0.0, 0.0
    e = d[i, j] / long_ax
    proj = hull @ np.array([-e[1], e[0]])
    return long_ax, float(proj.max() - proj.min())


def lung_rads_axes(mask: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, Any]:
    """Largest long axis over axial, coronal and sagittal images; the short axis on that image."""
    sz, sy, sx = spacing
    best = (0.0, 0.0, "axial", 0)
    for axis, name, (sr, sc) in ((0, "axial", (sy, sx)), (1, "coronal", (sz, sx)), (2, "sagittal", (sz, sy))):
        area = mask.sum(axis=tuple(a for a in range(3) if a != axis))
        for idx in np.argsort(area)[::-1][:3]:
            if area[idx] == 0:
                continue
            m2 = np.take(mask, idx, axis=axis)
            L, S = feret_axes_mm(m2, sr, sc)
            if L > best[0]:
                best = (L, S, name, int(idx))
    L, S = round(best[0], 1), round(best[1], 1)
    return {"long_axis_mm": L, "short_axis_mm": S, "mean_diameter_mm": round((L + S) / 2, 1), "plane": best[2]}


def lung_rads_category(kind: str, mean_mm: float, solid_mean_mm: float | None, juxtapleural: bool = False,
                       margin: str = "smooth") -> str:
    """Lung-RADS v2022 baseline category from size (and the v2022 juxtapleural rule)."""
    m = round(mean_mm, 1)
    if kind == "ground_glass":
        return "2" if m < 30 else "3"
    if kind == "part_solid":
        s = round(solid_mean_mm or 0.0, 1)
        if m < 6:
            return "2"
        if s < 6:
            return "3"
        return "4A" if s < 8 else "4B"
    if juxtapleural and margin == "smooth" and m < 10:
        return "2"  # v2022: smooth solid juxtapleural (perifissural-like) nodules < 10 mm
    if m < 6:
        return "2"
    if m < 8:
        return "3"
    return "4A" if m < 15 else "4B"


RING_MM = (1.0, 3.0)  # the neighbourhood a finding's lobe is read from: 1-3 mm outside its edge, as in 2D
NODULE_IDS = [V["nodule_solid"], V["nodule_ground_glass"]]
IN_LUNG_STRUCTURES = [V["pulmonary_vessel"], V["airway_lumen"], V["airway_wall"]] + NODULE_IDS


def connected_findings_3d(label: np.ndarray) -> int:
    """Findings as the label shows them: connected regions (26-neighbour) of the nodule classes (a part-solid
    nodule's core and halo are one region). Recomputable from the published label alone."""
    mask = np.isin(label, NODULE_IDS)
    if not mask.any():
        return 0
    return int(ndimage.label(mask, structure=np.ones((3, 3, 3), bool))[1])


def label_lobe_measures(label: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float], want: str,
                        want_lobe_id: int | None = None) -> dict[str, Any]:
    """A finding's lobe, in-lobe share and pleura/fissure contact, read from the published label alone (the phantom's
    lobe map is not published). ``mask``: the finding's voxels in the whole volume.

    - ``lobe`` / ``in_lobe_fraction``: lobe classes of the label in the shell 1-3 mm outside the finding (vessels,
      airways, findings and non-lung tissue do not count): the most frequent, and the requested lobe's share.
    - ``shell_in_lobe_fraction``, ``touches_pleura``, ``touches_fissure``: over the voxels touching the finding
      (one-voxel dilation, face neighbours) less vessels, airways and other findings: share in the requested lobe;
      any non-lung tissue; any other lobe (``schemas.volume_contact``, the rule the placement uses too)."""
    zz, yy, xx = np.nonzero(mask)
    pad = [int(math.ceil(RING_MM[1] / s)) + 1 for s in spacing]
    box = tuple(slice(max(0, lo.min() - p), min(n, lo.max() + 1 + p))
                for lo, p, n in zip((zz, yy, xx), pad, label.shape))
    m, lab = mask[box], label[box]
    want_id = LOBES[want] if want in LOBES else want_lobe_id
    dist = ndimage.distance_transform_edt(~m, sampling=spacing)
    ring = (dist > RING_MM[0]) & (dist <= RING_MM[1])
    counts = np.bincount(lab[ring].astype(np.int64), minlength=max(LUNG_IDS) + 1)[:max(LUNG_IDS) + 1]
    total = int(counts[LUNG_IDS].sum())
    lobe_id = int(LUNG_IDS[int(np.argmax(counts[LUNG_IDS]))]) if total else 0
    if want_id is None:
        want_id = lobe_id
    in_lobe = float(counts[want_id] / total) if total and want_id else 0.0
    c = shell_contact(lab, m, want_id)  # the same rule the placement judges contact by
    return {"lobe": LOBE_BY_ID.get(lobe_id, "none"), "in_lobe_fraction": round(in_lobe, 5),
            "shell_in_lobe_fraction": c["shell_in_lobe_fraction"], "touches_pleura": c["touches_pleura"],
            "touches_fissure": c["touches_fissure"]}


def measure_volume_findings(label: np.ndarray, instance: np.ndarray, lobes: np.ndarray | None, geom: VolumeGeometry,
                            placed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measurements of each placed finding from the label and instance maps alone (``lobes``, the phantom's lobe
    map, is not published and not used): anyone can recompute them from the published NIfTI files
    (bench/recompute_measurements.py)."""
    out = []
    aff = geom.lps_affine()
    for f in placed:
        k = f["instance"]
        (z0, z1), (y0, y1), (x0, x1) = f["box"]
        z0, y0, x0 = max(0, z0 - 1), max(0, y0 - 1), max(0, x0 - 1)
        box = (slice(z0, z1 + 1), slice(y0, y1 + 1), slice(x0, x1 + 1))
        m = instance[box] == k
        n = int(m.sum())
        if n == 0:
            out.append({"instance": k, "kind": f["kind"], "voxels": 0})
            continue
        vol = n * geom.voxel_mm3
        eq = (6 * vol / math.pi) ** (1 / 3)
        ax = lung_rads_axes(m, geom.spacing)
        solid = None
        if f["kind"] == "part_solid":
            core = m & (label[box] == V["nodule_solid"])
            if core.any():
                solid = lung_rads_axes(core, geom.spacing)
                solid["volume_mm3"] = round(float(core.sum() * geom.voxel_mm3))
        vox = np.argwhere(m) + [z0, y0, x0]
        idx = vox.mean(0)
        ijk1 = np.array([idx[2], idx[1], idx[0], 1.0])
        lps = aff @ ijk1
        full = np.zeros(instance.shape, bool)
        full[box] = m
        lm = label_lobe_measures(label, full, geom.spacing, f.get("location", "any"), f.get("lobe_id"))
        lo, hi = vox.min(0), vox.max(0) + 1  # the finding's exact extent, (k, j, i)
        out.append({
            "instance": k, "kind": f["kind"], "margin": f.get("margin", "smooth"), "voxels": n,
            "volume_mm3": round(vol), "volume_mm3_exact": round(vol, 3),
            "equivalent_diameter_mm": round(eq, 4), **ax,
            "solid_mean_diameter_mm": None if solid is None else solid["mean_diameter_mm"],
            "solid_volume_mm3": None if solid is None else solid["volume_mm3"],
            "centroid_ijk": [round(float(idx[2]), 3), round(float(idx[1]), 3), round(float(idx[0]), 3)],
            "centroid_lps_mm": [round(float(v), 3) for v in lps[:3]],
            **lm,
            "lung_rads": lung_rads_category(f["kind"], ax["mean_diameter_mm"],
                                            None if solid is None else solid["mean_diameter_mm"],
                                            bool(f.get("juxtapleural")), f.get("margin", "smooth")),
            "bbox_ijk": [int(lo[2]), int(lo[1]), int(lo[0]), int(hi[2]), int(hi[1]), int(hi[0])],
        })
    return out


def _median_from_hist(h: np.ndarray) -> float:
    c = np.cumsum(h)
    return float(np.searchsorted(c, (c[-1] + 1) // 2)) - 1024


def volume_qc(image: np.ndarray, label: np.ndarray, instance: np.ndarray, geom: VolumeGeometry,
              placed: list[dict[str, Any]], measured: list[dict[str, Any]], size_tol_mm: float = 0.5,
              min_in_lobe: float = 0.99, cnr_min: float = 3.0) -> dict[str, Any]:
    """Per-volume checks: tissue medians (every other slice and row), finding count, size, lobe, pleura/fissure,
    contrast-to-noise. Returns {"passed", "checks"}."""
    checks = []

    def chk(name, ok, value, rule):
        checks.append({"name": name, "passed": bool(ok), "value": value if not isinstance(value, float) else round(value, 4),
                       "rule": rule})

    hist = sampled_histograms(image, label)
    for name, (lo, hi) in HU_CHECK_RANGES.items():
        rows = hist[LUNG_IDS].sum(0) if name == "lung" else hist[V[name]]
        if rows.sum() < MIN_SAMPLED_VOXELS:
            continue
        v = _median_from_hist(rows)
        chk(f"median_hu_{name}", lo <= v <= hi, v, f"[{lo:g}, {hi:g}] HU")
    seen = connected_findings_3d(label)
    chk("finding_count", seen == len(placed), seen, f"== {len(placed)} connected findings in the label")
    for f, m in zip(placed, measured):
        k = f["instance"]
        tol = max(size_tol_mm, geom.spacing[2])
        want = (6 * f["volume_mm3"] / math.pi) ** (1 / 3) if f.get("volume_mm3") else float(f["diameter_mm"])
        err = abs(m.get("equivalent_diameter_mm", 0.0) - want)
        chk(f"size_{k}", err <= tol, err, f"|volume-equivalent diameter - {want:.3f} mm| <= {tol:g} mm")
        chk(f"in_lobe_{k}", m.get("in_lobe_fraction", 0) >= min_in_lobe, m.get("in_lobe_fraction", 0), f">= {min_in_lobe}")
        if not f.get("juxtapleural"):
            chk(f"off_pleura_fissure_{k}", not (m.get("touches_pleura") or m.get("touches_fissure")),
                int(bool(m.get("touches_pleura"))) + 2 * int(bool(m.get("touches_fissure"))), "touches neither")
        cnr = contrast_to_noise_3d(image, instance, label, f, geom)
        m["cnr"] = round(cnr, 3)
        chk(f"visible_{k}", cnr >= cnr_min, cnr, f"contrast-to-noise >= {cnr_min:g}")
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def contrast_to_noise_3d(image, instance, label, f, geom) -> float:
    (z0, z1), (y0, y1), (x0, x1) = f["box"]
    pad = [int(math.ceil(4 / s)) + 1 for s in geom.spacing]
    box = (slice(max(0, z0 - pad[0]), z1 + pad[0]), slice(max(0, y0 - pad[1]), y1 + pad[1]),
           slice(max(0, x0 - pad[2]), x1 + pad[2]))
    m = instance[box] == f["instance"]
    if not m.any():
        return 0.0
    dist = ndimage.distance_transform_edt(~m, sampling=geom.spacing)
    ring = (dist > 1.0) & (dist <= 4.0) & np.isin(label[box], LUNG_IDS)
    if ring.sum() < 10:
        return 0.0
    img = image[box].astype(np.float32)
    around = img[ring]
    med = float(np.median(around))
    sig = 1.4826 * float(np.median(np.abs(around - med)))
    return abs(float(np.median(img[m])) - med) / (sig + 1e-6)


# ---------------------------------------------------------------- the chest_ct_volume domain: annotator and hooks
from annotators import Annotation, check, register_annotator  # noqa: E402

VOLUME_DOMAIN = "chest_ct_volume"


@register_annotator(VOLUME_DOMAIN)
def annotate_chest_ct_volume(image: np.ndarray, layout: Any, request: Any, qc: Any) -> Annotation:
    """Measurements (volume, volume-equivalent diameter, Lung-RADS axes and category, lobe, centroid) and the
    per-volume QC, from the 3D label and instance maps. Boxes are in-plane (x, y) extents over all slices."""
    lay = layout.extras["volume"]
    g = lay["geometry"]
    measured = measure_volume_findings(lay["label"], lay["instance"], lay["lobes"], g, lay["nodules"])
    q = volume_qc(image, lay["label"], lay["instance"], g, lay["nodules"], measured,
                  size_tol_mm=float(getattr(qc, "size_tolerance_mm", 0.5)),
                  min_in_lobe=float(getattr(qc, "min_in_region", 0.99)), cnr_min=float(getattr(qc, "cnr_min", 3.0)))
    checks = [check(c["name"], c["passed"], None if c["value"] is None else float(c["value"]), c["rule"])
              for c in q["checks"]]
    if not lay["nodules"]:
        checks.append(check("negative_empty", not np.any(lay["instance"])))
    boxes = []
    ins = lay["instance"]
    for m in measured:
        if m.get("voxels"):
            x0, y0, z0, x1, y1, z1 = m["bbox_ijk"]  # the finding's exact extent
            boxes.append({"instance": int(m["instance"]), "x0": x0, "y0": y0, "x1": x1, "y1": y1})
    return Annotation(measured=measured, checks=checks, bboxes=boxes)


def _through(instance: np.ndarray) -> list[tuple[int, tuple[int, int, int]]]:
    """(instance id, centroid voxel (k, j, i)) of each finding; the volume centre when there is none."""
    ids = [int(v) for v in np.unique(instance) if v]
    if not ids:
        return [(0, tuple(int(s) // 2 for s in instance.shape))]
    out = []
    objs = ndimage.find_objects(instance.astype(np.int32))
    for k in ids:
        sl = objs[k - 1]
        sub = instance[sl] == k
        c = np.argwhere(sub).mean(0) + [s.start for s in sl]
        out.append((k, tuple(int(round(v)) for v in c)))
    return out


def _panel(img8: np.ndarray, lab: np.ndarray, ins: np.ndarray, table: Any, row_mm: float, col_mm: float,
           px_mm: float) -> np.ndarray:
    """One plane as RGB at square pixels of ``px_mm`` (labels nearest), lobes and findings outlined."""
    from annotators.overlay import instance_outline, outline

    h = max(1, int(round(img8.shape[0] * row_mm / px_mm)))
    w = max(1, int(round(img8.shape[1] * col_mm / px_mm)))
    v = cv2.resize(img8, (w, h), interpolation=cv2.INTER_LINEAR)
    lb = cv2.resize(lab.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    ib = cv2.resize(ins.astype(np.uint16), (w, h), interpolation=cv2.INTER_NEAREST)
    rgb = outline(v, lb, table, classes=list(LOBES.values()))
    return instance_outline(rgb, ib)


def triplanar(image: np.ndarray, label: np.ndarray, instance: np.ndarray, table: Any,
              spacing_kji: tuple[float, float, float], window: tuple[float, float] = (-600.0, 1500.0)) -> np.ndarray:
    """Axial, coronal and sagittal planes through each finding's centroid (one row per finding; the volume centre
    when there is none), at square display pixels, lobes and findings outlined. Coronal and sagittal are shown
    head up; sagittal anterior to the left."""
    from annotators.overlay import display

    sz, sy, sx = (float(v) for v in spacing_kji)
    px = min(sy, sx)
    rows = []
    for _k, (kz, jy, ix) in _through(instance):
        ax = _panel(display(image[kz], window), label[kz], instance[kz], table, sy, sx, px)
        co = _panel(display(image[:, jy, :], window), label[:, jy, :], instance[:, jy, :], table, sz, sx, px)
        sa = _panel(display(image[:, :, ix], window), label[:, :, ix], instance[:, :, ix], table, sz, sy, px)
        h = max(p.shape[0] for p in (ax, co, sa))
        pad = [np.pad(p, ((0, h - p.shape[0]), (0, 4), (0, 0))) for p in (ax, co, sa)]
        rows.append(np.concatenate(pad, axis=1))
    w = max(r.shape[1] for r in rows)
    return np.ascontiguousarray(np.concatenate([np.pad(r, ((0, 4), (0, w - r.shape[1]), (0, 0))) for r in rows]))


def preview_overlay(image: np.ndarray, label: np.ndarray, instance: np.ndarray, table: Any,
                    sample: Any = None) -> np.ndarray:
    """Hook for `pairforge preview`: the tri-planar overlay at the sample's voxel spacing."""
    geo = (((getattr(sample, "params", None) or {}).get("layout") or {}).get("geometry") or {})
    return triplanar(image, label, instance, table, tuple(geo.get("spacing_kji_mm") or (1.0, 1.0, 1.0)))


def _square(a: np.ndarray, row_mm: float, col_mm: float, px_mm: float, nearest: bool) -> np.ndarray:
    h = max(1, int(round(a.shape[0] * row_mm / px_mm)))
    w = max(1, int(round(a.shape[1] * col_mm / px_mm)))
    if nearest:
        return cv2.resize(a.astype(np.uint16), (w, h), interpolation=cv2.INTER_NEAREST)
    return cv2.resize(a.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


def card_view(image: np.ndarray, label: np.ndarray, instance: np.ndarray,
              meta: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hook for the card's sample grid: one tile of the axial, coronal and sagittal planes through the first
    finding (or the volume centre), side by side at square pixels (spacing from the file's affine)."""
    aff = np.asarray((meta or {}).get("affine", np.eye(4)), float)
    sx, sy, sz = (float(v) for v in np.sqrt((aff[:3, :3] ** 2).sum(0)))
    px = min(sx, sy)
    kz, jy, ix = _through(instance)[0][1]
    planes = [(image[kz], label[kz], instance[kz], sy, sx), (image[:, jy], label[:, jy], instance[:, jy], sz, sx),
              (image[:, :, ix], label[:, :, ix], instance[:, :, ix], sz, sy)]
    tiles = [[_square(a, r, c, px, nearest) for a, nearest in ((im, False), (lb, True), (ins, True))]
             for im, lb, ins, r, c in planes]
    # axial on the left; coronal above sagittal on the right (a near-square tile)
    out = []
    for j, fill in enumerate((-1024.0, 0, 0)):
        ax, co, sa = (t[j] for t in tiles)
        w = max(co.shape[1], sa.shape[1])
        right = np.concatenate([np.pad(co, ((0, 2), (0, w - co.shape[1])), constant_values=fill),
                                np.pad(sa, ((0, 0), (0, w - sa.shape[1])), constant_values=fill)])
        h = max(ax.shape[0], right.shape[0])
        out.append(np.concatenate([np.pad(ax, ((0, h - ax.shape[0]), (0, 2)), constant_values=fill),
                                   np.pad(right, ((0, h - right.shape[0]), (0, 0)), constant_values=fill)], axis=1))
    return out[0].astype(np.float32), out[1].astype(np.uint8), out[2].astype(np.uint16)


def volume_statistics(rows: list[dict], measured: list[list[dict]]) -> dict[str, Any]:
    """Volume-level statistics of a version (from its index rows): volumes, findings per volume, nodule volume and
    diameter, Lung-RADS categories, lobes, QC pass rate."""
    flat = [m for ms in measured for m in ms if m.get("voxels")]
    per = [len([m for m in ms if m.get("voxels")]) for ms in measured]
    vols = np.array([float(m.get("volume_mm3_exact", m.get("volume_mm3", 0.0))) for m in flat], float)
    eqd = np.array([float(m.get("equivalent_diameter_mm", 0.0)) for m in flat], float)
    lr: dict[str, int] = {}
    lobes: dict[str, int] = {}
    for m in flat:
        lr[str(m.get("lung_rads"))] = lr.get(str(m.get("lung_rads")), 0) + 1
        lobes[str(m.get("lobe"))] = lobes.get(str(m.get("lobe")), 0) + 1
    qc = [bool((r.get("qc") or {}).get("passed", True)) for r in rows]
    q = (lambda a, p: round(float(np.percentile(a, p)), 2) if a.size else None)
    return {"volumes": len(rows), "volumes_with_findings": int(sum(1 for n in per if n)),
            "findings": len(flat), "findings_per_volume_max": max(per) if per else 0,
            "nodule_volume_mm3": {"min": q(vols, 0), "median": q(vols, 50), "max": q(vols, 100)},
            "equivalent_diameter_mm": {"min": q(eqd, 0), "median": q(eqd, 50), "max": q(eqd, 100)},
            "lung_rads": dict(sorted(lr.items())), "lobes": dict(sorted(lobes.items())),
            "qc_pass_rate": round(float(np.mean(qc)), 4) if qc else None}


def card_plots(rows: list[dict], requested: list[list[dict]], measured: list[list[dict]]):
    """Hook for the dataset card: one figure of volume-level statistics (nodule volumes, findings per volume,
    Lung-RADS categories, lobes) with the numbers in its title."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = volume_statistics(rows, measured)
    flat = [m for ms in measured for m in ms if m.get("voxels")]
    fig, axes = plt.subplots(1, 4, figsize=(13, 2.8))
    vols = [float(m.get("volume_mm3_exact", 0.0)) for m in flat]
    axes[0].hist(vols or [0], bins=12, color="#4c72b0")
    axes[0].set(title="nodule volume (mm³)", xlabel="mm³", ylabel="findings")
    per = [len([m for m in ms if m.get("voxels")]) for ms in measured]
    ks = sorted(set(per)) or [0]
    axes[1].bar([str(k) for k in ks], [per.count(k) for k in ks], color="#55a868")
    axes[1].set(title="findings per volume", ylabel="volumes")
    axes[2].bar(list(st["lung_rads"]) or ["-"], list(st["lung_rads"].values()) or [0], color="#c44e52")
    axes[2].set(title="Lung-RADS category (measured)")
    axes[3].bar(list(st["lobes"]) or ["-"], list(st["lobes"].values()) or [0], color="#8172b2")
    axes[3].set(title="lobe (by overlap)")
    fig.suptitle(f"{st['volumes']} volumes, {st['findings']} findings, median volume "
                 f"{st['nodule_volume_mm3']['median']} mm³, QC pass {st['qc_pass_rate']}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    return [("volume_statistics", "volume_statistics.png", buf.getvalue())]


def card_text(rows: list[dict], requested: list[list[dict]], measured: list[list[dict]]) -> list[str]:
    """Hook for the dataset card: volume-level statistics as Markdown lines."""
    st = volume_statistics(rows, measured)
    return ["## Volume statistics", "", "| statistic | value |", "| --- | --- |",
            *[f"| {k.replace('_', ' ').replace(' mm3', ' (mm³)').replace(' mm', ' (mm)')} | "
              f"{', '.join(f'{a} {b}' for a, b in v.items()) if isinstance(v, dict) else v} |" for k, v in st.items()],
            ""]
