"""Chest-CT measurements from the label map and MAISI-style quality checks.

Every size here is computed from the label itself (pixel counts and pixel-corner Feret diameters), never
copied from the request.
"""
from __future__ import annotations

import math
import threading
from typing import Any

import cv2
import numpy as np

from annotators import Annotation, bounding_box, check, register_annotator
from schemas.chest_ct import CT_IDS, DOMAIN, LOBES
from schemas.findings import SIDE_LOBES
from schemas.sample import Layout, SampleRequest

C = CT_IDS
LOBE_BY_ID = {v: k for k, v in LOBES.items()}
LUNG_IDS = list(LOBES.values())
NODULE_IDS = [CT_IDS["nodule_solid"], CT_IDS["nodule_ground_glass"]]
_IS_NODULE = np.zeros(256, np.uint8)
_IS_NODULE[NODULE_IDS] = 1
_IS_LUNG = np.zeros(256, bool)
_IS_LUNG[LUNG_IDS] = True

# Median HU each tissue must show in a rendered slice (published ranges widened by noise and partial volume;
# ../shared/docs/DOMAIN.md). A class is checked only where it has at least MIN_PIXELS pixels.
HU_CHECK_RANGES: dict[str, tuple[float, float]] = {
    "lung": (-950.0, -700.0),
    "subcutaneous_fat": (-150.0, -50.0),
    "muscle": (0.0, 100.0),
    "heart": (0.0, 100.0),
    "great_vessel": (0.0, 100.0),
    "cancellous_bone": (150.0, 600.0),
    "liver": (20.0, 100.0),
}
MIN_PIXELS = 200
HU_OFFSET = 1024
HU_BINS = 4096


def feret_axes(mask: np.ndarray) -> tuple[float, float]:
    """Long axis (max Feret diameter) and the largest width perpendicular to it, in pixels, over pixel squares."""
    cs, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    pts = np.concatenate([c.reshape(-1, 2) for c in cs]).astype(np.float64)
    corners = (pts[:, None, :] + np.array([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])[None]).reshape(-1, 2)
    hull = cv2.convexHull(corners.astype(np.float32)).reshape(-1, 2).astype(np.float64)
    d = hull[:, None, :] - hull[None, :, :]
    dist2 = (d ** 2).sum(-1)
    i, j = np.unravel_index(np.argmax(dist2), dist2.shape)
    long_ax = math.sqrt(dist2[i, j])
    if long_ax == 0:
        return 1.0, 1.0
    direction = d[i, j] / long_ax
    perp = np.array([-direction[1], direction[0]])
    proj = hull @ perp
    return long_ax, float(proj.max() - proj.min())


def lung_rads_size_category(kind: str, mean_axis_mm: float, solid_mean_axis_mm: float | None) -> str:
    """Lung-RADS v1.1 baseline category from size alone (../shared/docs/DOMAIN.md)."""
    m = round(mean_axis_mm, 1)
    if kind == "ground_glass":
        return "2" if m < 30 else "3"
    if kind == "part_solid":
        s = round(solid_mean_axis_mm or 0.0, 1)
        if m < 6:
            return "2"
        if s < 6:
            return "3"
        return "4A" if s < 8 else "4B"
    if m < 6:
        return "2"
    if m < 8:
        return "3"
    return "4A" if m < 15 else "4B"


RING_MM = (1.0, 3.0)  # the neighbourhood a finding's lobe is read from: 1-3 mm outside its edge


def ring_lobe_counts(label: np.ndarray, m: np.ndarray, y0: int, x0: int, spacing_mm: float) -> np.ndarray:
    """Lobe-class pixel counts in the ring 1-3 mm around a finding mask ``m`` (placed at ``y0, x0`` in ``label``),
    read from the published label alone: vessels, airways, other findings and non-lung tissue do not count."""
    r_in = max(1, int(round(RING_MM[0] / spacing_mm)))
    r_out = max(r_in + 1, int(round(RING_MM[1] / spacing_mm)))
    pad = r_out + 1
    h, w = label.shape
    ya, yb, xa, xb = max(0, y0 - pad), min(h, y0 + m.shape[0] + pad), max(0, x0 - pad), min(w, x0 + m.shape[1] + pad)
    big = np.zeros((yb - ya, xb - xa), np.uint8)
    big[y0 - ya:y0 - ya + m.shape[0], x0 - xa:x0 - xa + m.shape[1]] = m
    ring = (cv2.dilate(big, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r_out + 1,) * 2)) > 0) & ~(
        cv2.dilate(big, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r_in + 1,) * 2)) > 0)
    return np.bincount(label[ya:yb, xa:xb][ring].astype(np.int64), minlength=max(LUNG_IDS) + 1)[:max(LUNG_IDS) + 1]


def measure_findings(label: np.ndarray, instance: np.ndarray, lobes: np.ndarray | None, spacing_mm: float,
                     placed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measurements of each placed finding from the label and instance maps. ``lobes`` (the phantom's own lobe map,
    not published) is not used: lobe and in-region share are read from the lobe classes of the label in a ring
    around the finding, so anyone can recompute them from the published files."""
    out = []
    sp = spacing_mm
    h, w = label.shape
    for f in placed:
        k = f["instance"]
        cx, cy = f["center_px"]
        r = int(math.ceil(f["shape"]["radius_px"] * 2.2)) + 3
        y0, y1 = max(0, int(cy) - r), min(h, int(cy) + r + 1)
        x0, x1 = max(0, int(cx) - r), min(w, int(cx) + r + 1)
        m = instance[y0:y1, x0:x1] == k
        area = int(m.sum())
        if area == 0:
            out.append({"instance": k, "kind": f["kind"], "area_px": 0})
            continue
        ys, xs = np.nonzero(m)
        long_px, short_px = feret_axes(m)
        eq = 2 * math.sqrt(area / math.pi) * sp
        solid = (label[y0:y1, x0:x1] == C["nodule_solid"]) & m
        solid_mean = None
        if f["kind"] == "part_solid" and solid.any():
            sl, ss = feret_axes(solid)
            solid_mean = (sl + ss) / 2 * sp
        counts = ring_lobe_counts(label, m.astype(np.uint8), y0, x0, sp)
        lung_total = int(counts[LUNG_IDS].sum())
        lobe_id = int(LUNG_IDS[int(np.argmax(counts[LUNG_IDS]))]) if lung_total else 0
        want = f.get("requested_location", "any")
        want_ids = LUNG_IDS if want == "any" else [LOBES[n] for n in SIDE_LOBES[want]] if want in SIDE_LOBES \
            else [LOBES[want]]
        in_region = float(counts[want_ids].sum() / lung_total) if lung_total else 0.0
        mean_axis = (long_px + short_px) / 2 * sp
        out.append({
            "instance": k, "kind": f["kind"], "margin": f["margin"],
            "area_px": area, "area_mm2": round(area * sp * sp, 4),
            "equivalent_diameter_mm": round(eq, 4),
            "long_axis_mm": round(long_px * sp, 4), "short_axis_mm": round(short_px * sp, 4),
            "mean_axis_mm": round(mean_axis, 4),
            "solid_mean_axis_mm": None if solid_mean is None else round(solid_mean, 4),
            "centroid_px": [round(float(xs.mean()) + x0, 3), round(float(ys.mean()) + y0, 3)],
            "centroid_mm": [round((float(xs.mean()) + x0 + 0.5 - w / 2) * sp, 3),
                            round((float(ys.mean()) + y0 + 0.5 - h / 2) * sp, 3)],
            "lobe": LOBE_BY_ID.get(lobe_id, "none"),
            "in_region_fraction": round(in_region, 5),
            "lung_rads_size_category": lung_rads_size_category(f["kind"], mean_axis, solid_mean),
            "bbox_px": bounding_box(ys + y0, xs + x0),
        })
    return out


def class_histograms(image: np.ndarray, label: np.ndarray, classes: list[int] | None = None) -> np.ndarray:
    """HU histogram (1 HU bins from -1024) of every class id, in one pass: shape (256, 4096); with ``classes``, of
    those ids only, in their order: shape (len(classes), 4096) (the same counts, a smaller table)."""
    if classes is not None and label.dtype == np.uint8 and label.ndim == 2 and image.shape == label.shape:
        # The same counts with no full-frame temporaries: per-thread scratch arrays and one int64 index pass.
        n = len(classes)
        row = np.full(256, n * HU_BINS, np.int32)  # every other class goes to one spare row, dropped below
        row[list(classes)] = np.arange(n, dtype=np.int32) * HU_BINS
        q = _scratch("q", image.shape, np.float32)
        np.add(image, HU_OFFSET, out=q, casting="unsafe")
        np.clip(q, 0, HU_BINS - 1, out=q)
        idx = _scratch("idx", image.shape, np.int64)
        np.copyto(idx, q, casting="unsafe")  # truncation, as astype
        np.add(idx, cv2.LUT(label, row, dst=_scratch("row", image.shape, np.int32)), out=idx)
        return np.bincount(idx.ravel(), minlength=(n + 1) * HU_BINS).reshape(n + 1, HU_BINS)[:n]
    q = np.clip(image + HU_OFFSET, 0, HU_BINS - 1).astype(np.int32)
    if classes is None:
        hist = np.bincount(label.astype(np.int32).ravel() * HU_BINS + q.ravel(), minlength=256 * HU_BINS)
        return hist.reshape(256, HU_BINS)
    n = len(classes)
    row = np.full(256, n, np.int32)  # every other class goes to one spare row, dropped below
    row[list(classes)] = np.arange(n, dtype=np.int32)
    idx = cv2.LUT(label, row) if label.dtype == np.uint8 and label.ndim == 2 else row[label]
    idx *= HU_BINS
    idx += q
    return np.bincount(idx.ravel(), minlength=(n + 1) * HU_BINS).reshape(n + 1, HU_BINS)[:n]


_SCRATCH = threading.local()


def _scratch(key: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A reusable array of this thread (contents undefined; callers overwrite it whole)."""
    d = getattr(_SCRATCH, "d", None)
    if d is None:
        d = _SCRATCH.d = {}
    a = d.get(key)
    if a is None or a.shape != tuple(shape) or a.dtype != dtype:
        a = d[key] = np.empty(shape, dtype)
    return a


def histogram_median(hist: np.ndarray) -> float:
    cum = np.cumsum(hist)
    return float(np.searchsorted(cum, (cum[-1] + 1) // 2)) - HU_OFFSET


def contrast_to_noise(image: np.ndarray, instance: np.ndarray, label: np.ndarray, f: dict, spacing: float) -> float:
    """|median(finding) - median(ring)| / robust std(ring), the ring being the lung parenchyma 1-4 mm outside it."""
    k = f["instance"]
    cx, cy = f["center_px"]
    r = int(math.ceil(f["shape"]["radius_px"] * 2.2 + 5 / spacing)) + 3
    h, w = image.shape
    y0, y1 = max(0, int(cy) - r), min(h, int(cy) + r + 1)
    x0, x1 = max(0, int(cx) - r), min(w, int(cx) + r + 1)
    m = (instance[y0:y1, x0:x1] == k).astype(np.uint8)
    if not m.any():
        return 0.0
    r1 = max(1, int(round(1 / spacing)))
    r4 = max(r1 + 2, int(round(4 / spacing)))
    k1 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r1 + 1, 2 * r1 + 1))
    k4 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r4 + 1, 2 * r4 + 1))
    ring = (cv2.dilate(m, k4) > 0) & ~(cv2.dilate(m, k1) > 0)
    ring &= _IS_LUNG[label[y0:y1, x0:x1]]  # parenchyma only, not vessels or other findings
    if ring.sum() < 10:
        return 0.0
    crop = image[y0:y1, x0:x1]
    inside = crop[m > 0]
    around = crop[ring]
    # Robust spread (MAD): blurred vessel edges in the ring are structure, not noise.
    med = float(np.median(around))
    sigma = 1.4826 * float(np.median(np.abs(around - med)))
    return float(abs(float(np.median(inside)) - med) / (sigma + 1e-6))


def connected_findings(label: np.ndarray) -> int:
    """Findings as the label shows them: connected regions (8-neighbour) of the nodule classes (a part-solid
    nodule's solid core and ground-glass halo are one region). Recomputable from the published label alone."""
    mask = cv2.LUT(label, _IS_NODULE) if label.dtype == np.uint8 and label.ndim == 2 else \
        np.isin(label, NODULE_IDS).astype(np.uint8)
    x, y, bw, bh = cv2.boundingRect(mask)
    if bw == 0:
        return 0
    n, _ = cv2.connectedComponents(mask[y:y + bh, x:x + bw], connectivity=8)
    return int(n - 1)


# Registered for the domain by annotators.ct_insertion (phantom or real-scan samples).
def annotate_chest_ct(image: np.ndarray, layout: Layout, request: SampleRequest, qc: Any) -> Annotation:
    lobes = layout.extras.get("lobes")
    sp = layout.spacing_mm
    measured = measure_findings(layout.label, layout.instance, lobes, sp, layout.findings)
    checks = []
    hist_ids = list(dict.fromkeys(LUNG_IDS + [C[name] for name in HU_CHECK_RANGES if name != "lung"]))
    hist = class_histograms(image, layout.label, hist_ids)
    hist_row = {k: i for i, k in enumerate(hist_ids)}
    for name, (lo, hi) in HU_CHECK_RANGES.items():
        rows = hist[[hist_row[k] for k in LUNG_IDS]].sum(0) if name == "lung" else hist[hist_row[C[name]]]
        if rows.sum() < MIN_PIXELS:
            continue
        value = histogram_median(rows)
        checks.append(check(f"median_hu_{name}", lo <= value <= hi, value, f"[{lo:g}, {hi:g}] HU"))
    tol_mm = getattr(qc, "size_tolerance_mm", 0.5)
    cnr_min = getattr(qc, "cnr_min", 3.0)
    min_in = getattr(qc, "min_in_region", 0.99)
    seen = connected_findings(layout.label)
    checks.append(check("finding_count", seen == len(request.findings), seen,
                        f"== {len(request.findings)} connected findings in the label"))
    for f, m in zip(layout.findings, measured):
        k = f["instance"]
        tol = max(tol_mm, sp)
        err = abs(m.get("equivalent_diameter_mm", 0.0) - f["diameter_mm"])
        checks.append(check(f"size_{k}", err <= tol, err, f"|equivalent diameter - {f['diameter_mm']:g} mm| <= {tol:g} mm"))
        checks.append(check(f"in_lobe_{k}", m.get("in_region_fraction", 0) >= min_in, m.get("in_region_fraction", 0),
                            f">= {min_in:g} of pixels in {f.get('requested_location', 'any')}"))
        cnr = contrast_to_noise(image, layout.instance, layout.label, f, sp)
        m["cnr"] = round(cnr, 3)
        checks.append(check(f"visible_{k}", cnr >= cnr_min, cnr, f"contrast-to-noise >= {cnr_min:g}"))
    bboxes = [{"instance": m["instance"], "x0": m["bbox_px"][0], "y0": m["bbox_px"][1], "x1": m["bbox_px"][2],
               "y1": m["bbox_px"][3]} for m in measured if "bbox_px" in m]
    return Annotation(measured=measured, checks=checks, bboxes=bboxes)


def preview_overlay(image: np.ndarray, label: np.ndarray, instance: np.ndarray, table: Any) -> np.ndarray:
    """`pairforge preview`'s overlay: lung window, lobe outlines (vessels closed over), findings in yellow."""
    from annotators.overlay import WINDOWS, closed_regions, instance_outline, outline, window

    lobe_view = closed_regions(label, LUNG_IDS + [C["pulmonary_vessel"], C["airway_lumen"], C["airway_wall"],
                                                  C["nodule_solid"], C["nodule_ground_glass"]])
    lobe_view[~np.isin(lobe_view, LUNG_IDS)] = 0
    view = outline(window(image, *WINDOWS["lung"]), lobe_view, table)
    return instance_outline(view, instance)
