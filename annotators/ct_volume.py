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

V = VOLUME_IDS
LOBE_BY_ID = {v: k for k, v in LOBES.items()}
LUNG_IDS = list(LOBES.values())

HU_CHECK_RANGES: dict[str, tuple[float, float]] = {
    "lung": (-950.0, -700.0), "subcutaneous_fat": (-150.0, -50.0), "muscle": (0.0, 100.0), "heart": (0.0, 100.0),
    "great_vessel": (0.0, 100.0), "cancellous_bone": (100.0, 600.0), "liver": (20.0, 100.0),
}


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


def measure_volume_findings(label: np.ndarray, instance: np.ndarray, lobes: np.ndarray, geom: VolumeGeometry,
                            placed: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
        idx = np.argwhere(m).mean(0) + [z0, y0, x0]
        ijk1 = np.array([idx[2], idx[1], idx[0], 1.0])
        lps = aff @ ijk1
        lb = lobes[box]
        counts = np.bincount(lb[m], minlength=17)
        lobe_id = int(np.argmax(counts[LUNG_IDS])) + LUNG_IDS[0]
        want = f.get("location", "any")
        want_id = f.get("lobe_id") if want == "any" else LOBES[want]
        in_lobe = float(counts[want_id] / n)
        shell = ndimage.binary_dilation(m, iterations=1) & ~m
        sv = lb[shell]
        shell_in = float((sv == want_id).mean()) if sv.size else 1.0
        touches_pleura = bool((sv == 0).any())
        touches_fissure = bool(((sv != 0) & (sv != want_id)).any())
        out.append({
            "instance": k, "kind": f["kind"], "margin": f.get("margin", "smooth"), "voxels": n,
            "volume_mm3": round(vol), "volume_mm3_exact": round(vol, 3),
            "equivalent_diameter_mm": round(eq, 4), **ax,
            "solid_mean_diameter_mm": None if solid is None else solid["mean_diameter_mm"],
            "solid_volume_mm3": None if solid is None else solid["volume_mm3"],
            "centroid_ijk": [round(float(idx[2]), 3), round(float(idx[1]), 3), round(float(idx[0]), 3)],
            "centroid_lps_mm": [round(float(v), 3) for v in lps[:3]],
            "lobe": LOBE_BY_ID[lobe_id], "in_lobe_fraction": round(in_lobe, 5), "shell_in_lobe_fraction": round(shell_in, 5),
            "touches_pleura": touches_pleura, "touches_fissure": touches_fissure,
            "lung_rads": lung_rads_category(f["kind"], ax["mean_diameter_mm"],
                                            None if solid is None else solid["mean_diameter_mm"],
                                            bool(f.get("juxtapleural")), f.get("margin", "smooth")),
            "bbox_ijk": [x0, y0, z0, x1 + 1, y1 + 1, z1 + 1],
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

    sub_l = label[::2, ::2, ::2].astype(np.int32).ravel()
    sub_i = np.clip(image[::2, ::2, ::2].astype(np.int32) + 1024, 0, 4095).ravel()
    hist = np.bincount(sub_l * 4096 + sub_i, minlength=256 * 4096).reshape(256, 4096)
    for name, (lo, hi) in HU_CHECK_RANGES.items():
        rows = hist[LUNG_IDS].sum(0) if name == "lung" else hist[V[name]]
        if rows.sum() < 200:
            continue
        v = _median_from_hist(rows)
        chk(f"median_hu_{name}", lo <= v <= hi, v, f"[{lo:g}, {hi:g}] HU")
    chk("finding_count", len(measured) == len(placed), len(measured), f"== {len(placed)}")
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
