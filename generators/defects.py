"""Defect geometry at exact physical size: scratches (polylines with a width profile), branching cracks, dents and
pits (shaded depressions), stains (thresholded noise, DRAEM-style), holes, particles and chipped edges.

``draw_shape_params`` draws a record (pixels: this is inside a generator) and ``defect_shape`` is a pure function
of it returning a local crop: boolean mask, height map in mm (negative = depression) and a 0..1 cross profile
used by the appearance models. Sizes are hit by construction: centreline arc length for lines, exact pixel count
(area) for round defects, exact extents for chipped edges.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from scipy.spatial import cKDTree

W_END_PX = 1.0  # width at the tips of scratches and cracks (pixels): the mask ends in a one-pixel cap


@dataclass
class Shape:
    mask: np.ndarray  # bool crop
    height_mm: np.ndarray  # float32 crop, <= 0 inside depressions, > 0 on particles
    profile: np.ndarray  # float32 crop, 1 on the defect's core fading to 0 at its border (0 outside)
    params: dict[str, Any]


def _u(rng, lo, hi):
    return round(float(rng.uniform(lo, hi)), 5)


def draw_shape_params(f: dict[str, Any], spacing_mm: float, rng: np.random.Generator,
                      orientation_deg: float | None = None, edge: str | None = None) -> dict[str, Any]:
    """Draw the shape record of one requested finding (sizes from the request, the rest from rng)."""
    kind = f["kind"]
    px = 1.0 / spacing_mm
    p: dict[str, Any] = {"kind": kind, "seed": int(rng.integers(0, 2**63 - 1)), "depth_mm": float(f.get("depth_mm", 0))}
    if kind in ("scratch", "crack"):
        ang = orientation_deg if orientation_deg is not None else float(rng.uniform(0, 180))
        p.update(length_px=f["length_mm"] * px, width_px=f["width_mm"] * px, angle_deg=round(ang, 4),
                 width_mod=_u(rng, 0.0, 0.25), width_phase=_u(rng, 0, 2 * np.pi), taper=_u(rng, 0.1, 0.25))
        if kind == "scratch":
            p.update(bend=_u(rng, -0.05, 0.05), wiggle=_u(rng, 0.0, 0.006), wiggle_phase=_u(rng, 0, 2 * np.pi))
        else:
            # segments several widths long: the skeleton of a band follows its centreline only on gentle turns
            seg = max(8.0, 3 * f["width_mm"] * px, f["length_mm"] * px / 30)
            p.update(segment_px=round(seg, 4), jitter_deg=_u(rng, 12, 30), branches=int(rng.integers(0, 4)),
                     branch_width=_u(rng, 0.5, 0.75))
    elif kind in ("dent", "pit", "stain", "hole", "particle"):
        aspect = {"dent": (1.0, 1.4), "pit": (1.0, 1.2), "stain": (1.0, 1.8), "hole": (1.0, 1.0),
                  "particle": (1.0, 1.6)}[kind]
        p.update(diameter_px=f["diameter_mm"] * px, aspect=_u(rng, *aspect), angle_deg=_u(rng, 0, 180),
                 roughness={"dent": 0.0, "pit": 0.08, "stain": 0.6, "hole": 0.0, "particle": 0.25}[kind])
        if kind == "stain":
            p["noise_cells"] = int(rng.integers(2, 6))  # DRAEM: Perlin scales 2^k
    elif kind == "missing_material":
        p.update(length_px=f["length_mm"] * px, width_px=f["width_mm"] * px, edge=edge or "top_edge",
                 jag=_u(rng, 0.05, 0.2), skew=_u(rng, -0.3, 0.3))
    else:
        raise ValueError(f"unknown defect kind {kind!r}")
    return p


# ------------------------------------------------------------------------------------------------- lines

def _densify(poly: np.ndarray, ds: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Points every ~ds pixels along a polyline and their arc length."""
    seg = np.diff(poly, axis=0)
    seg_len = np.hypot(seg[:, 0], seg[:, 1])
    s_nodes = np.concatenate([[0.0], np.cumsum(seg_len)])
    n = max(2, int(np.ceil(s_nodes[-1] / ds)) + 1)
    s = np.linspace(0, s_nodes[-1], n)
    x = np.interp(s, s_nodes, poly[:, 0])
    y = np.interp(s, s_nodes, poly[:, 1])
    return np.stack([x, y], 1), s


def _width_profile(s: np.ndarray, length: float, mean_w: float, p: dict[str, Any], w_end: float = W_END_PX):
    """Width along the line: tapers to w_end at both tips, mean over arc length equal to mean_w."""
    u = s / max(length, 1e-9)
    t = max(p["taper"], 1e-3)
    env = np.clip(np.minimum(u, 1 - u) / t, 0, 1)
    env = env * env * (3 - 2 * env)
    mod = env * (1 + p["width_mod"] * np.sin(2 * np.pi * 2.0 * u + p["width_phase"]))
    w0 = w_end + (mean_w - w_end) / max(float(mod.mean()), 1e-6)
    return w_end + (w0 - w_end) * mod


def _scratch_centreline(p: dict[str, Any]) -> np.ndarray:
    lc = p["length_px"] - W_END_PX
    u = np.linspace(0, 1, 400)
    y = p["bend"] * 4 * u * (1 - u) + p["wiggle"] * np.sin(2 * np.pi * 3 * u + p["wiggle_phase"])
    pts = np.stack([u, y], 1)
    arc = np.hypot(*np.diff(pts, axis=0).T).sum()
    pts *= lc / arc  # scaling keeps the shape: arc length is exactly lc
    return pts


def _random_walk(g: np.random.Generator, start: np.ndarray, heading: float, length: float, seg: float,
                 jitter: float) -> np.ndarray:
    n = max(2, int(round(length / seg)))
    step = length / n
    dev = np.zeros(n)
    e = g.normal(0, jitter, n)
    for i in range(1, n):
        dev[i] = np.clip(0.6 * dev[i - 1] + e[i], -0.6, 0.6)  # within +-35 degrees of the heading
    h = heading + dev
    steps = np.stack([np.cos(h), np.sin(h)], 1) * step
    return np.concatenate([start[None], start[None] + np.cumsum(steps, 0)])


def _chaikin(poly: np.ndarray, rounds: int = 2) -> np.ndarray:
    """Corner cutting: rounds the walk's corners so a crack's length is a smooth curve's length."""
    for _ in range(rounds):
        q = 0.75 * poly[:-1] + 0.25 * poly[1:]
        r = 0.25 * poly[:-1] + 0.75 * poly[1:]
        mid = np.empty((2 * len(q), 2))
        mid[0::2], mid[1::2] = q, r
        poly = np.concatenate([poly[:1], mid[1:-1], poly[-1:]])
    return poly


def _with_length(poly: np.ndarray, length: float) -> np.ndarray:
    """Scale a polyline about its first point so its arc length is exactly ``length``."""
    cur = float(np.hypot(*np.diff(poly, axis=0).T).sum())
    return poly[:1] + (poly - poly[:1]) * (length / max(cur, 1e-12))


def _tube(parts: list[tuple[np.ndarray, np.ndarray]], depth_mm: float, pad: int = 3) -> Shape:
    """Rasterise tubes (points, radii) exactly: a pixel is inside when its centre is within the local radius of the
    centreline, measured to the nearest centreline segment (radius interpolated along it)."""
    pts = np.concatenate([q for q, _ in parts])
    rad = np.concatenate([r for _, r in parts])
    # segment j joins point j and j+1; it is valid only inside one part
    valid = np.ones(len(pts), bool)
    valid[np.cumsum([len(q) for q, _ in parts]) - 1] = False
    rmax = float(rad.max())
    lo = np.floor(pts.min(0) - rmax - pad)
    pts = pts - lo
    hi = np.ceil(pts.max(0) + rmax + pad).astype(int)
    w, h = int(hi[0]) + 1, int(hi[1]) + 1
    cand = np.zeros((h, w), np.uint8)
    thick = int(np.ceil(2 * rmax)) + 3
    for q, _ in parts:
        cv2.polylines(cand, [np.round((q - lo) * 16).astype(np.int32)], False, 1, thick, cv2.LINE_8, 4)
    ys, xs = np.nonzero(cand)
    c = np.stack([xs, ys], 1).astype(np.float64)
    _, idx = cKDTree(pts).query(c)
    best_d = np.full(len(c), np.inf)
    best_r = np.zeros(len(c))
    n = len(pts)
    for j in (idx - 1, idx):  # the two segments around the nearest sample
        ok = (j >= 0) & (j < n - 1)
        jj = np.clip(j, 0, n - 2)
        ok &= valid[jj]
        a, b = pts[jj], pts[jj + 1]
        ab = b - a
        t = np.clip(((c - a) * ab).sum(1) / np.maximum((ab * ab).sum(1), 1e-12), 0, 1)
        d = np.hypot(*(a + t[:, None] * ab - c).T)
        r = rad[jj] + t * (rad[jj + 1] - rad[jj])
        d = np.where(ok, d, np.inf)
        better = d - r < best_d - best_r
        best_d, best_r = np.where(better, d, best_d), np.where(better, r, best_r)
    dp = np.hypot(*(pts[idx] - c).T)  # single-point parts and tips: distance to the sample itself
    better = dp - rad[idx] < best_d - best_r
    best_d, best_r = np.where(better, dp, best_d), np.where(better, rad[idx], best_r)
    inside = best_d <= best_r
    mask = np.zeros((h, w), bool)
    mask[ys[inside], xs[inside]] = True
    prof = np.zeros((h, w), np.float32)
    prof[ys[inside], xs[inside]] = np.clip(1 - (best_d[inside] / np.maximum(best_r[inside], 1e-6)) ** 2, 0.05, 1)
    height = -depth_mm * prof
    return Shape(mask, height.astype(np.float32), prof, {"centreline_offset_px": [float(lo[0]), float(lo[1])]})


def _rot(pts: np.ndarray, angle_deg: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), -np.sin(a)  # image y points down: counter-clockwise on screen
    return pts @ np.array([[c, s], [-s, c]])


def scratch_shape(p: dict[str, Any]) -> Shape:
    pts, s = _densify(_rot(_scratch_centreline(p), p["angle_deg"]))
    w = _width_profile(s, s[-1], p["width_px"], p)
    return _tube([(pts, w / 2)], p["depth_mm"])


def crack_shape(p: dict[str, Any]) -> Shape:
    g = np.random.default_rng(p["seed"])
    lc = p["length_px"] - W_END_PX
    jit = np.deg2rad(p["jitter_deg"])
    trunk = _random_walk(g, np.zeros(2), np.deg2rad(-p["angle_deg"]), lc, p["segment_px"], jit)
    # Straighten the walk's overall direction back onto the requested angle (length is unchanged by rotation).
    chord = trunk[-1] - trunk[0]
    trunk = _rot(trunk, np.rad2deg(np.arctan2(chord[1], chord[0])) + p["angle_deg"])
    trunk = _with_length(_chaikin(trunk), lc)
    pts, s = _densify(trunk)
    w = _width_profile(s, s[-1], p["width_px"], p)
    parts = [(pts, w / 2)]
    branches = []
    for _ in range(p["branches"]):
        sb = float(g.uniform(0.25, 0.75)) * s[-1]
        room = 0.45 * min(sb, s[-1] - sb)
        blen = float(g.uniform(0.4, 1.0)) * room
        if blen < 4 * p["segment_px"] / 3 or blen < 6:
            continue
        i = int(np.searchsorted(s, sb))
        tang = pts[min(i + 1, len(pts) - 1)] - pts[max(i - 1, 0)]
        head = np.arctan2(tang[1], tang[0]) + float(g.choice([-1, 1])) * np.deg2rad(g.uniform(25, 55))
        bp = _random_walk(g, pts[i], head, blen, p["segment_px"], jit)
        bp = _with_length(_chaikin(bp), blen)
        bpts, bs = _densify(bp)
        bw0 = max(W_END_PX, p["branch_width"] * w[i])
        bw = W_END_PX + (bw0 - W_END_PX) * (1 - bs / bs[-1])
        parts.append((bpts, bw / 2))
        branches.append({"start_px": round(sb, 3), "length_px": round(blen, 3)})
    shape = _tube(parts, p["depth_mm"])
    shape.params["branch_geometry"] = branches
    return shape


# ------------------------------------------------------------------------------------------------- blobs

def _blob(p: dict[str, Any], field_fn) -> tuple[np.ndarray, np.ndarray]:
    """Select exactly round(pi d^2 / 4) pixels with the lowest field value: the area (hence the equivalent
    diameter) is exact to half a pixel; ``field_fn`` shapes the outline."""
    d = p["diameter_px"]
    r = d / 2 * np.sqrt(p["aspect"]) * (1 + p["roughness"]) + 3
    n = int(np.ceil(r))
    yy, xx = np.mgrid[-n:n + 1, -n:n + 1].astype(np.float32)
    a = np.deg2rad(p["angle_deg"])
    u = xx * np.cos(a) + yy * np.sin(a)
    v = -xx * np.sin(a) + yy * np.cos(a)
    ra, rb = d / 2 * np.sqrt(p["aspect"]), d / 2 / np.sqrt(p["aspect"])
    rho = np.sqrt((u / ra) ** 2 + (v / rb) ** 2)
    field = field_fn(rho, xx, yy, n)
    target = max(1, int(round(np.pi * d * d / 4)))
    flat = field.ravel()
    k = np.argpartition(flat, target - 1)[:target]
    mask = np.zeros(flat.size, bool)
    mask[k] = True
    mask = mask.reshape(field.shape)
    thr = float(flat[k].max())
    rel = np.clip(field / max(thr, 1e-6), 0, 1)  # 0 at the centre, 1 at the border
    return mask, rel.astype(np.float32)


def round_shape(p: dict[str, Any]) -> Shape:
    kind = p["kind"]
    g = np.random.default_rng(p["seed"])

    def field(rho, xx, yy, n):
        if kind == "stain":  # DRAEM: thresholded Perlin-like noise, here kept around a centre for placement
            cells = max(2.0, 2 * n / p["noise_cells"])
            noise = cv2.resize(g.random((int(2 * n / cells) + 3,) * 2, dtype=np.float32) * 2 - 1,
                               (2 * n + 1, 2 * n + 1), interpolation=cv2.INTER_CUBIC)
            return rho + p["roughness"] * noise
        if p["roughness"] > 0:
            th = np.arctan2(yy, xx)
            harm = sum(g.normal(0, 1) * np.cos(k * th + g.uniform(0, 6.3)) / k for k in range(2, 6))
            return rho * (1 + p["roughness"] * 0.5 * harm)
        return rho

    mask, rel = _blob(p, field)
    depth = p["depth_mm"]
    if kind in ("dent", "pit"):
        height = -depth * np.clip(1 - rel * rel, 0, 1) ** 2
    elif kind == "hole":
        height = -depth * (rel < 0.999).astype(np.float32)
    elif kind == "particle":
        height = depth * np.sqrt(np.clip(1 - rel * rel, 0, 1))
    else:
        height = np.zeros_like(rel)
    height = np.where(mask, height, 0).astype(np.float32)
    prof = np.where(mask, np.clip(1 - rel, 0.05, 1), 0).astype(np.float32)
    return Shape(mask, height, prof, {})


# ------------------------------------------------------------------------------------------------- chipped edge

def chip_shape(p: dict[str, Any]) -> Shape:
    """Missing material along an edge, built for the top edge (row 0 = the edge) and turned to ``edge``.
    Extent along the edge and depth into the part are exact in pixel centres."""
    g = np.random.default_rng(p["seed"])
    L, D = p["length_px"], p["width_px"]
    n_cols = max(1, int(round(L)))
    t = (np.arange(n_cols) + 0.5) / n_cols  # column centres, 0..1 along the chip
    peak = 0.5 + 0.5 * p["skew"]
    u = np.where(t < peak, t / peak, (1 - t) / (1 - peak))
    prof = np.sqrt(np.clip(1 - (1 - u) ** 2, 0, 1))
    knots = g.uniform(-1, 1, 8)
    jag = 1 + p["jag"] * np.interp(t, np.linspace(0, 1, 8), knots)
    dep = prof * jag
    dep = dep / dep.max() * D
    rows = max(1, int(round(D)))
    ii = np.arange(rows)[:, None] + 0.5
    mask = ii <= np.maximum(dep[None, :], 0.5 + 1e-6)  # every column holds at least its edge pixel
    mask[int(round(D)) - 1, int(np.argmax(dep))] = True
    rel = np.where(mask, ii / np.maximum(dep[None, :], 0.5), 0).astype(np.float32)
    height = np.where(mask, -p["depth_mm"], 0).astype(np.float32)
    prof_out = np.where(mask, np.clip(rel, 0.05, 1), 0).astype(np.float32)
    mask, height, prof_out = (_orient_edge(a, p["edge"]) for a in (mask, height, prof_out))
    return Shape(mask, height, prof_out, {})


def _orient_edge(a: np.ndarray, edge: str) -> np.ndarray:
    if edge == "top_edge":
        return a
    if edge == "bottom_edge":
        return a[::-1]
    if edge == "left_edge":
        return np.ascontiguousarray(a.T)
    return np.ascontiguousarray(a.T[:, ::-1])  # right edge


def defect_shape(p: dict[str, Any]) -> Shape:
    k = p["kind"]
    if k == "scratch":
        return scratch_shape(p)
    if k == "crack":
        return crack_shape(p)
    if k == "missing_material":
        return chip_shape(p)
    return round_shape(p)
