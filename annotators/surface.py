"""Surface-defect measurements from the mask and QC.

Definitions (all from the label/instance map, never from the request):
- scratch / crack ``length_mm``: the longest path through the mask's skeleton (for a crack: its trunk; branches
  are shorter by construction), smoothed along the path (Gaussian, 1.5 px, point-reflected ends) to remove the
  pixel staircase (scratches also Douglas-Peucker simplified at 0.5 px, which removes the long stairs of shallow
  slopes; a crack's zigzag is real and is kept), plus how far the mask reaches beyond each end of the path along
  its direction. ``width_mm``: area of the pixels whose nearest skeleton
  pixel lies on that path, divided by its length (mean width).
- dent / pit / stain / hole / particle ``diameter_mm``: equivalent diameter sqrt(4 area / pi).
- missing_material ``length_mm``: extent along its edge; ``width_mm``: extent into the part.
- ``in_region_fraction``: share of the defect's pixels inside the requested region (and on the part).
- ``contrast``: RMS deviation of the defect's pixels from the mean of a ring around it (0.5 mm, at least 3 px,
  other defects and off-part pixels excluded), divided by the ring's standard deviation floored at 2 grey levels.
  QC passes at ``qc.cnr_min`` (default 1.5): an untouched patch scores about 1.

QC per defect: |measured - requested| <= max(qc.size_tolerance_mm, one pixel) for every requested size;
in_region_fraction >= qc.min_in_region; contrast >= qc.cnr_min. A defect-free sample must have an empty mask.
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, dijkstra
from scipy.spatial import cKDTree
from skimage.morphology import skeletonize

from annotators import Annotation, box_record, check, register_annotator
from schemas.sample import Layout, SampleRequest
from schemas.surface import OUTSIDE_PART, part_box, region_box

CONTRAST_FLOOR_GREY = 2.0
SMOOTH_SIGMA_PX = 1.5

_OFFSETS = ((0, 1, 1.0), (1, 0, 1.0), (1, 1, np.sqrt(2)), (1, -1, np.sqrt(2)))


def longest_skeleton_path(skel: np.ndarray) -> np.ndarray:
    """Ordered (y, x) pixel coordinates of the longest geodesic path through a skeleton (two Dijkstra sweeps)."""
    ys, xs = np.nonzero(skel)
    n = len(ys)
    if n <= 1:
        return np.stack([ys, xs], 1).astype(float)
    idx = -np.ones((skel.shape[0] + 2, skel.shape[1] + 2), np.int64)
    idx[ys + 1, xs + 1] = np.arange(n)
    rows, cols, wts = [], [], []
    for dy, dx, wt in _OFFSETS:
        nb = idx[ys + 1 + dy, xs + 1 + dx]
        ok = nb >= 0
        rows.append(np.arange(n)[ok])
        cols.append(nb[ok])
        wts.append(np.full(int(ok.sum()), wt))
    r, c, wv = np.concatenate(rows), np.concatenate(cols), np.concatenate(wts)
    g = coo_matrix((wv, (r, c)), shape=(n, n)).tocsr()
    _, comp = connected_components(g, directed=False)
    start = int(np.flatnonzero(comp == np.bincount(comp).argmax())[0])  # the largest piece of the skeleton
    d0 = dijkstra(g, directed=False, indices=start)
    d0[~np.isfinite(d0)] = -1
    a = int(np.argmax(d0))
    da, pred = dijkstra(g, directed=False, indices=a, return_predecessors=True)
    da[~np.isfinite(da)] = -1
    b = int(np.argmax(da))
    path = [b]
    while path[-1] != a and pred[path[-1]] >= 0:
        path.append(int(pred[path[-1]]))
    path = np.array(path[::-1])
    return np.stack([ys[path], xs[path]], 1).astype(float)


def _smooth_path(p: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing along the path with point-reflected ends (keeps straight lines and end points)."""
    if len(p) < 3:
        return p
    k = min(len(p) - 1, int(np.ceil(3 * sigma)))
    pre = 2 * p[0] - p[k:0:-1]
    post = 2 * p[-1] - p[-2:-k - 2:-1]
    q = gaussian_filter1d(np.concatenate([pre, p, post]), sigma, axis=0, mode="nearest")
    return q[k:k + len(p)]


DP_EPSILON_PX = 0.5


def _polyline_length(sm: np.ndarray, simplify: bool = True) -> float:
    """Length of the smoothed path after Douglas-Peucker simplification: chords skip the pixel staircase that
    smoothing alone leaves on shallow slopes, and follow real bends to within DP_EPSILON_PX."""
    if len(sm) < 2:
        return 0.0
    if simplify and DP_EPSILON_PX > 0:
        q = cv2.approxPolyDP(sm[:, ::-1].astype(np.float32).reshape(-1, 1, 2), DP_EPSILON_PX, False).reshape(-1, 2)
    else:
        q = sm
    return float(np.hypot(*np.diff(q, axis=0).T).sum())


def _end_extent(pix: np.ndarray, end: np.ndarray, direction: np.ndarray, half_width: float) -> float:
    """How far the mask reaches beyond a path end along the path's direction: the largest projection of the mask
    pixels in a lateral band around the end, plus the pixel's own half extent in that direction."""
    nrm = float(np.hypot(*direction))
    if nrm < 1e-9:
        return 0.5
    d = direction / nrm
    v = pix - end[None]
    proj = v @ d
    lat = np.abs(v[:, 0] * d[1] - v[:, 1] * d[0])
    sel = (lat <= half_width + 1.0) & (proj > -1.0) & (proj < 4 * half_width + 6)
    reach = float(proj[sel].max()) if sel.any() else 0.0
    return max(reach, 0.0) + 0.5 * (abs(d[0]) + abs(d[1]))


def measure_line(mask: np.ndarray, simplify: bool = True) -> dict[str, float]:
    """Length along the skeleton's longest path and mean width, in pixels, of a line-like mask crop.
    ``simplify``: Douglas-Peucker on the smoothed path (gently curved lines: scratches); a crack's zigzag is real
    and chords would cut it, so cracks keep the smoothed path."""
    m = np.pad(mask, 2)
    skel = skeletonize(m)
    path = longest_skeleton_path(skel)
    if len(path) == 0:
        return {"length_px": 0.0, "width_px": 0.0, "trunk_area_px": 0.0}
    sm = _smooth_path(path, SMOOTH_SIGMA_PX)
    length = _polyline_length(sm, simplify)
    k = min(len(path) - 1, 4)
    if k > 0:
        pix = np.argwhere(m).astype(float)
        half = 0.5 * float(m.sum()) / max(length, 1.0)
        length += _end_extent(pix, sm[-1], sm[-1] - sm[-1 - k], half)
        length += _end_extent(pix, sm[0], sm[0] - sm[k], half)
    else:  # a dot: its extent
        length = 1.0
    # trunk area: mask pixels whose nearest skeleton pixel is on the path
    sy, sx = np.nonzero(skel)
    on_path = np.zeros(skel.shape, bool)
    on_path[path[:, 0].astype(int), path[:, 1].astype(int)] = True
    my, mx = np.nonzero(m)
    if len(sy) > len(path):
        _, nn = cKDTree(np.stack([sy, sx], 1)).query(np.stack([my, mx], 1))
        trunk_area = float(on_path[sy[nn], sx[nn]].sum())
    else:
        trunk_area = float(len(my))
    dy, dx = path[-1] - path[0]
    return {"length_px": length, "width_px": trunk_area / max(length, 1e-9), "trunk_area_px": trunk_area,
            "chord_angle_deg": float(np.rad2deg(np.arctan2(-dy, dx)) % 180)}


def instance_boxes(instance: np.ndarray) -> list[tuple[slice, slice] | None]:
    """Bounding slices per instance id (index k-1 for id k), from one pass over the non-zero pixels."""
    flat = instance.ravel()
    nz = np.flatnonzero(flat)
    if nz.size == 0:
        return []
    ids = flat[nz]
    n = int(ids.max())
    out: list[tuple[slice, slice] | None] = [None] * n
    order = np.argsort(ids, kind="stable")
    ids_s, nz_s = ids[order], nz[order]
    starts = np.searchsorted(ids_s, np.arange(1, n + 2))
    w = instance.shape[1]
    for k in range(1, n + 1):
        sel = nz_s[starts[k - 1]:starts[k]]
        if sel.size:
            ys, xs = sel // w, sel % w
            out[k - 1] = (slice(int(ys.min()), int(ys.max()) + 1), slice(int(xs.min()), int(xs.max()) + 1))
    return out


def _grey(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32).mean(axis=2) if img.ndim == 3 else img.astype(np.float32)


def defect_contrast(img_crop: np.ndarray, m: np.ndarray, ring_ok: np.ndarray, ring_px: int) -> float:
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * ring_px + 1,) * 2)
    ring = cv2.dilate(m.astype(np.uint8), k).astype(bool) & ~m & ring_ok
    if ring.sum() < 5 or m.sum() == 0:
        return 0.0
    g = _grey(img_crop)
    mu, sd = float(g[ring].mean()), float(g[ring].std())
    rms = float(np.sqrt(np.mean((g[m] - mu) ** 2)))
    return rms / max(sd, CONTRAST_FLOOR_GREY)


def _edge_of(region) -> str | None:
    return region if isinstance(region, str) and region.endswith("_edge") else None


@register_annotator("surface")
def annotate_surface(image: np.ndarray, layout: Layout, request: SampleRequest, qc: Any) -> Annotation:
    sp = layout.spacing_mm
    h, w = layout.label.shape
    on_part = layout.label != OUTSIDE_PART
    pbox = part_box(on_part if not on_part.all() else None, (h, w))
    objs = instance_boxes(layout.instance)
    tol = max(float(getattr(qc, "size_tolerance_mm", 0.2)), sp)
    min_in = float(getattr(qc, "min_in_region", 1.0))
    cmin = float(getattr(qc, "cnr_min", 1.5))
    ring_px = max(3, int(round(0.5 / sp)))
    measured, checks, bboxes = [], [], []
    for f in layout.findings:
        k = f["instance"]
        kind = f["kind"]
        sl = objs[k - 1] if k - 1 < len(objs) else None
        if sl is None:
            measured.append({"instance": k, "kind": kind, "area_mm2": 0.0})
            checks.append(check(f"present:{k}", False, 0, "> 0 pixels", f"{kind} {k} has no pixels"))
            continue
        pad = ring_px + 2
        csl = tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(sl, (h, w)))
        inst = layout.instance[csl]
        m = inst == k
        area_px = int(m.sum())
        ys, xs = np.nonzero(m)
        rec: dict[str, Any] = {"instance": k, "kind": kind, "region": f.get("region"),
                               "area_mm2": round(area_px * sp * sp, 5),
                               "centroid_mm": [round(float((xs.mean() + csl[1].start + 0.5) * sp), 4),
                                               round(float((ys.mean() + csl[0].start + 0.5) * sp), 4)]}
        if kind in ("scratch", "crack"):
            ml = measure_line(m[ys.min():ys.max() + 1, xs.min():xs.max() + 1], simplify=kind == "scratch")
            rec.update(length_mm=round(ml["length_px"] * sp, 4), width_mm=round(ml["width_px"] * sp, 4),
                       orientation_deg=round(ml["chord_angle_deg"], 2))
        elif kind == "missing_material":
            edge = _edge_of(f.get("region")) or "top_edge"
            along_cols = edge in ("top_edge", "bottom_edge")
            n_cols, n_rows = int(m.any(axis=0).sum()), int(m.any(axis=1).sum())
            rec.update(length_mm=round((n_cols if along_cols else n_rows) * sp, 4),
                       width_mm=round((n_rows if along_cols else n_cols) * sp, 4))
        else:
            rec["diameter_mm"] = round(2 * np.sqrt(area_px / np.pi) * sp, 4)
        # region
        extent = f.get("length_mm") or f.get("diameter_mm") or 0.0
        ry0, rx0, ry1, rx1 = region_box(f.get("region", f.get("location", "any")), pbox, sp, extent)
        gy, gx = ys + csl[0].start, xs + csl[1].start
        inside = (gy >= ry0) & (gy < ry1) & (gx >= rx0) & (gx < rx1) & on_part[gy, gx]
        rec["in_region_fraction"] = round(float(inside.mean()), 5)
        ring_ok = (inst == 0) & on_part[csl]
        rec["contrast"] = round(defect_contrast(image[csl], m, ring_ok, ring_px), 4)
        measured.append(rec)
        bboxes.append(box_record(k, gy, gx, kind=kind))
        errs = {q: abs(rec[q] - f[q]) for q in ("length_mm", "width_mm", "diameter_mm") if q in f and q in rec}
        worst = max(errs.values()) if errs else 0.0
        detail = ", ".join(f"{q} {rec[q]:.3f} vs {f[q]:.3f}" for q in errs)
        checks.append(check(f"size:{k}", worst <= tol + 1e-9, worst, f"<= {tol:.3f} mm (max of tolerance, 1 px)",
                            f"{kind} {k}: {detail}"))
        checks.append(check(f"in_region:{k}", rec["in_region_fraction"] >= min_in, rec["in_region_fraction"],
                            f">= {min_in:g}", f"{kind} {k} in {f.get('region')}"))
        checks.append(check(f"contrast:{k}", rec["contrast"] >= cmin, rec["contrast"], f">= {cmin:g}",
                            f"{kind} {k}: RMS deviation from the surround / surround std"))
    if not layout.findings:
        n_def = int(((layout.label > 0) & (layout.label != OUTSIDE_PART)).sum())
        checks.append(check("empty_mask", n_def == 0, n_def, "0 defect pixels", "defect-free sample"))
    return Annotation(measured=measured, checks=checks, bboxes=bboxes)


def preview_overlay(image: np.ndarray, label: np.ndarray, instance: np.ndarray, table: Any) -> np.ndarray:
    """`pairforge preview`'s overlay: the image with each defect outlined in red."""
    from annotators.overlay import instance_outline

    rgb = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return instance_outline(rgb, instance, color=(255, 40, 40))
