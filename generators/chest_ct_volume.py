"""3D chest-CT phantom: continuous anatomy from shoulders to upper abdomen, five lobes, vessel/airway trees.

Sample-then-apply: ``draw_volume_anatomy`` draws one flat parameter record from the sample's rng (body habitus,
organ sizes, fissure shapes, the vessel and airway trees as segment lists); ``draw_volume`` rasterises that
record on any voxel grid with no randomness of its own. Because the anatomy lives in millimetres, the same
record drawn on two grids gives the same patient. Frame: x patient-left, y posterior, z inferior from the
lung apex (``schemas.volume.VolumeGeometry``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from schemas.classes import LOBES
from schemas.volume import VOLUME_IDS, VolumeGeometry

V = VOLUME_IDS
SHIFT = 3
SCALE = 1 << SHIFT
LOBE_IDS = (LOBES["RUL"], LOBES["RML"], LOBES["RLL"], LOBES["LUL"], LOBES["LLL"])


def _smooth(t, lo: float, hi: float):
    if isinstance(t, float):
        u = min(1.0, max(0.0, (t - lo) / (hi - lo)))
        return u * u * (3 - 2 * u)
    u = np.clip((np.asarray(t, float) - lo) / (hi - lo), 0.0, 1.0)
    return u * u * (3 - 2 * u)


# ----------------------------------------------------------------------------------------------- tubes
@dataclass
class Tubes:
    """Tapered capsules: segment end points (N, 3) in (z, y, x) mm and radii at both ends."""

    p0: np.ndarray
    p1: np.ndarray
    r0: np.ndarray
    r1: np.ndarray
    terminal: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    @staticmethod
    def from_polyline(pts: np.ndarray, radius: float | np.ndarray) -> "Tubes":
        pts = np.asarray(pts, float)
        r = np.broadcast_to(np.asarray(radius, float), (len(pts),))
        return Tubes(pts[:-1].copy(), pts[1:].copy(), r[:-1].copy(), r[1:].copy(), np.zeros(len(pts) - 1, bool))

    @staticmethod
    def concat(items: list["Tubes"]) -> "Tubes":
        items = [t for t in items if len(t.p0)]
        if not items:
            z = np.zeros((0, 3))
            return Tubes(z, z, np.zeros(0), np.zeros(0), np.zeros(0, bool))
        return Tubes(*(np.concatenate([getattr(t, a) for t in items]) for a in ("p0", "p1", "r0", "r1", "terminal")))

    def __len__(self) -> int:
        return len(self.p0)


def tube_pieces(t: Tubes, geom: VolumeGeometry, slab: bool, radius_scale: float = 1.0):
    """Clip every capsule to every slice it reaches; return per piece (slice, x0, y0, x1, y1 px, thickness px,
    weight). ``slab``: a piece covers the slice's whole slab (thin structures: the label marks where the tube
    passes through the voxel); else the plane through the slice centre (its exact cross-section, within a
    stadium approximation). ``weight`` is the share of the voxel the tube fills (z and in-plane partial volume).
    """
    if len(t) == 0:
        return np.zeros(0, int), *(np.zeros(0),) * 5, np.zeros(0)
    sz, sy, sx = geom.spacing
    nz = geom.shape[0]
    r = 0.5 * (t.r0 + t.r1) * radius_scale
    d = t.p1 - t.p0
    L = np.linalg.norm(d, axis=1) + 1e-9
    cos_t = np.abs(d[:, 0]) / L  # cosine of the angle to the z axis
    sin_t = np.sqrt(np.maximum(0.0, 1 - cos_t ** 2))
    half = r * np.where(sin_t > 1e-6, (1 - cos_t) / np.maximum(sin_t, 1e-6), 0.0)  # r*tan(theta/2)
    if slab:
        half = half + sz / 2
    zlo = np.minimum(t.p0[:, 0], t.p1[:, 0]) - half
    zhi = np.maximum(t.p0[:, 0], t.p1[:, 0]) + half
    k0 = np.ceil(geom.to_index(np.stack([zlo, 0 * zlo, 0 * zlo], 1))[:, 0] - 1e-9).astype(int)
    k1 = np.floor(geom.to_index(np.stack([zhi, 0 * zhi, 0 * zhi], 1))[:, 0] + 1e-9).astype(int)
    k0 = np.maximum(k0, 0)
    k1 = np.minimum(k1, nz - 1)
    n = np.maximum(0, k1 - k0 + 1)
    seg = np.repeat(np.arange(len(t)), n)
    if len(seg) == 0:
        return np.zeros(0, int), *(np.zeros(0),) * 5, np.zeros(0)
    offs = np.arange(len(seg)) - np.repeat(np.cumsum(n) - n, n)
    ks = k0[seg] + offs
    zk = geom.axis_mm(0)[ks]
    dz = d[seg, 0]
    a = t.p0[seg]
    # parameter range along the segment whose z lies within zk +- half
    with np.errstate(divide="ignore", invalid="ignore"):
        ta = np.where(np.abs(dz) > 1e-9, (zk - half[seg] - a[:, 0]) / dz, -np.inf)
        tb = np.where(np.abs(dz) > 1e-9, (zk + half[seg] - a[:, 0]) / dz, np.inf)
    lo = np.clip(np.minimum(ta, tb), 0, 1)
    hi = np.clip(np.maximum(ta, tb), 0, 1)
    q0 = a + lo[:, None] * d[seg]
    q1 = a + hi[:, None] * d[seg]
    c = np.asarray(geom.center)
    ny, nx = geom.shape[1], geom.shape[2]
    x0 = (q0[:, 2] - c[2]) / sx + nx / 2 - 0.5
    y0 = (q0[:, 1] - c[1]) / sy + ny / 2 - 0.5
    x1 = (q1[:, 2] - c[2]) / sx + nx / 2 - 0.5
    y1 = (q1[:, 1] - c[1]) / sy + ny / 2 - 0.5
    width_px = 2 * r[seg] / sx
    thick = np.maximum(1, np.round(width_px)).astype(int)
    w_xy = np.minimum(1.0, width_px / thick)
    w_z = np.minimum(1.0, 2 * r[seg] / np.maximum(sin_t[seg], 1e-3) / sz) if slab else np.ones(len(seg))
    return ks, x0, y0, x1, y1, thick, w_xy * w_z


def draw_tubes(vol: np.ndarray, t: Tubes, geom: VolumeGeometry, value: int | None, slab: bool = False,
               radius_scale: float = 1.0, where: np.ndarray | None = None,
               also: tuple[np.ndarray, int] | None = None) -> None:
    """Paint capsules into ``vol`` (uint8, [k, j, i]). ``value`` None paints the partial-volume weight
    (0-255, the largest weight wins). ``where`` (bool lookup by current label) limits what may be painted over."""
    ks, x0, y0, x1, y1, th, w = tube_pieces(t, geom, slab, radius_scale)
    if len(ks) == 0:
        return
    col = np.round(np.clip(w, 0, 1) * 255).astype(int) if value is None else np.full(len(ks), int(value))
    order = np.lexsort((col, ks))
    X0 = np.round(x0 * SCALE).astype(int)
    Y0 = np.round(y0 * SCALE).astype(int)
    X1 = np.round(x1 * SCALE).astype(int)
    Y1 = np.round(y1 * SCALE).astype(int)
    bounds = np.searchsorted(ks[order], np.arange(vol.shape[0] + 1))
    ny, nx = vol.shape[1:]
    pad = (th + 2) * SCALE
    for k in np.unique(ks):
        idx = order[bounds[k]:bounds[k + 1]]
        direct = where is None and value is not None
        if direct:
            tgt, ox, oy = vol[k], 0, 0
        else:  # a scratch window round this slice's pieces
            bx0 = max(0, int(min(X0[idx].min(), X1[idx].min()) - pad[idx].max()) >> SHIFT)
            by0 = max(0, int(min(Y0[idx].min(), Y1[idx].min()) - pad[idx].max()) >> SHIFT)
            bx1 = min(nx, (int(max(X0[idx].max(), X1[idx].max()) + pad[idx].max()) >> SHIFT) + 1)
            by1 = min(ny, (int(max(Y0[idx].max(), Y1[idx].max()) + pad[idx].max()) >> SHIFT) + 1)
            if bx1 <= bx0 or by1 <= by0:
                continue
            tgt = np.zeros((by1 - by0, bx1 - bx0), np.uint8)
            ox, oy = bx0 << SHIFT, by0 << SHIFT
        for m in idx:
            cv2.line(tgt, (int(X0[m]) - ox, int(Y0[m]) - oy), (int(X1[m]) - ox, int(Y1[m]) - oy), int(col[m]),
                     int(th[m]), cv2.LINE_8, SHIFT)
        if not direct:
            win = vol[k][by0:by1, bx0:bx1]
            sel = tgt > 0
            if where is not None:
                sel &= where[win] if value is not None else where[k][by0:by1, bx0:bx1]
            if value is None:
                win[sel] = np.maximum(win[sel], tgt[sel])
            else:
                win[sel] = value
            if also is not None:  # paint a label where the weight was painted
                also[0][k][by0:by1, bx0:bx1][sel] = also[1]


# ------------------------------------------------------------------------------------------ anatomy record
def draw_volume_anatomy(rng: np.random.Generator) -> dict[str, Any]:
    """One patient: a flat record of every drawn number (trees are added by ``grow_trees``)."""
    u = lambda a, b: float(rng.uniform(a, b))  # noqa: E731
    H = u(235, 275)
    fat = u(7, 24)
    p: dict[str, Any] = {
        "lung_height_mm": H,
        "body_half_width_mm": u(150, 168), "body_half_depth_mm": u(102, 120), "fat_mm": fat,
        "wall_mm": u(8, 12), "female": bool(rng.random() < 0.5), "breast_mm": u(25, 55),
        "cavity_shape": u(2.1, 2.6),
        "apex_level": u(0.14, 0.2), "apex_offset_mm": u(32, 42),
        "mediastinum_half_mm": u(20, 27),
        "dome_right_level": u(0.74, 0.8), "dome_left_level": u(0.79, 0.86), "dome_depth": u(1.05, 1.25),
        "heart": {"x": u(18, 30), "y": u(-38, -25), "a": u(52, 62), "b": u(38, 46),
                  "c": u(42, 50), "angle_deg": u(-40, -25), "wall_mm": u(8, 11)},
        "carina_level": u(0.3, 0.36), "arch_level": u(0.22, 0.28),
        "aorta_r_mm": u(12, 15), "trachea_r_mm": u(8, 10),
        "spine_y_mm": u(26, 32), "vert_r_mm": u(19, 23), "disc_mm": u(4, 6),
        "oblique_post_level": (u(0.1, 0.16), u(0.1, 0.16)), "oblique_ant_level": (u(0.88, 0.96), u(0.86, 0.94)),
        "horizontal_level": u(0.5, 0.56), "horizontal_tilt": u(-0.08, 0.08),
        "fissure_ripple": [[u(-4, 4), u(0.01, 0.03), u(0, 6.3)] for _ in range(4)],
        "rib_drop_mm": [u(35, 60) for _ in range(12)], "rib_r_mm": u(3.6, 4.6),
        "arm_gap_mm": u(4, 20),
        "tree_seed": int(rng.integers(0, 2**31 - 1)),
    }
    # the heart rests on the diaphragm: its lowest point a few mm above the lower dome top
    p["heart"]["level"] = (0.5 * (p["dome_right_level"] + p["dome_left_level"]) * H - p["heart"]["c"] + 8) / H
    return p


# -------------------------------------------------------------------------------------- shape functions
def body_axes(P: dict, z: float) -> tuple[float, float]:
    H = P["lung_height_mm"]
    t = z / H
    aw, bd = P["body_half_width_mm"], P["body_half_depth_mm"]
    # neck -> shoulders -> chest -> abdomen
    w = aw * (0.48 + 0.52 * _smooth(t, -0.3, -0.02)) * (1 - 0.06 * _smooth(t, 0.9, 1.3))
    d = bd * (0.62 + 0.38 * _smooth(t, -0.3, 0.1)) * (1 + 0.05 * _smooth(t, 0.5, 1.1))
    return float(w), float(d)


def cavity_axes(P: dict, z: float) -> tuple[float, float, float]:
    """Inner rib-cage half width, half depth and the y of its centre."""
    H = P["lung_height_mm"]
    t = z / H
    w, d = body_axes(P, z)
    wall = P["fat_mm"] + P["wall_mm"]
    cw = (w - wall - 4) * (0.7 + 0.3 * _smooth(t, -0.1, 0.35))
    cd = (d - wall - 6) * (0.78 + 0.22 * _smooth(t, -0.05, 0.4))
    return float(cw), float(cd), float(d * 0.02)


def oblique_z(P: dict, side: int, x: np.ndarray, y: np.ndarray, z_unused=None) -> np.ndarray:
    """z (mm) of the oblique fissure at (x, y); the lower lobe lies below (greater z)."""
    H = P["lung_height_mm"]
    si = 0 if side < 0 else 1
    zp = P["oblique_post_level"][si] * H
    za = P["oblique_ant_level"][si] * H
    _, cd, yc = cavity_axes(P, 0.5 * H)
    yp, ya = yc + cd, yc - 0.7 * cd
    zf = zp + (yp - y) * (za - zp) / (yp - ya)
    for a, f, ph in P["fissure_ripple"]:
        zf = zf + a * np.sin(f * (x * 0.7 + y) + ph) * 0.5
    # at one level the fissure runs from the hilum (anterior, medial) to the chest wall (posterior, lateral)
    return zf + (za - zp) / (yp - ya) * 0.45 * (np.abs(x) - 60)


def horizontal_z(P: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    H = P["lung_height_mm"]
    return P["horizontal_level"] * H + P["horizontal_tilt"] * (y + 20) + 0.04 * (np.abs(x) - 60)


def dome_z(P: dict, side: int, x: np.ndarray, y: np.ndarray, z: float | None = None) -> np.ndarray:
    """z of the diaphragm under lung ``side``: a bowl, highest at its centre, deepest in the recesses."""
    H = P["lung_height_mm"]
    top = (P["dome_right_level"] if side < 0 else P["dome_left_level"]) * H
    cw, cd, yc = cavity_axes(P, top)
    rx, ry = cw * 0.62, cd * 0.95
    xc, ycd = side * cw * 0.42, yc - 0.1 * cd
    q = ((x - xc) / rx) ** 2 + ((y - ycd) / ry) ** 2
    return top + (H * P["dome_depth"] - top) * np.minimum(q, 1.6)


def heart_section(P: dict, z: float) -> tuple[float, float, float, float, float] | None:
    h = P["heart"]
    H = P["lung_height_mm"]
    dz = (z - h["level"] * H) / h["c"]
    if abs(dz) >= 1:
        return None
    s = math.sqrt(1 - dz * dz)
    return h["x"] - 8 * dz, h["y"] + 6 * dz, h["a"] * s, h["b"] * s, h["angle_deg"]


def _px(geom: VolumeGeometry, x: float, y: float) -> tuple[int, int]:
    sz, sy, sx = geom.spacing
    return (int(round(((x - geom.center[2]) / sx + geom.shape[2] / 2 - 0.5) * SCALE)),
            int(round(((y - geom.center[1]) / sy + geom.shape[1] / 2 - 0.5) * SCALE)))


def _ell(img, geom, value, x, y, ax, ay, angle=0.0):
    if ax <= 0 or ay <= 0:
        return
    sx = geom.spacing[2]
    cv2.ellipse(img, _px(geom, x, y), (max(1, int(round(ax / sx * SCALE))), max(1, int(round(ay / sx * SCALE)))),
                float(angle), 0, 360, int(value), -1, cv2.LINE_8, SHIFT)


def _poly(img, geom, value, pts):
    sz, sy, sx = geom.spacing
    q = np.empty((len(pts), 2))
    q[:, 0] = ((pts[:, 0] - geom.center[2]) / sx + geom.shape[2] / 2 - 0.5) * SCALE
    q[:, 1] = ((pts[:, 1] - geom.center[1]) / sy + geom.shape[1] / 2 - 0.5) * SCALE
    cv2.fillPoly(img, [np.round(q).astype(np.int32)], int(value), cv2.LINE_8, SHIFT)


def superellipse(cx, cy, ax, ay, n, k=96, post_flat=0.0):
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    x = ax * np.sign(c) * np.abs(c) ** (2 / n)
    y = ay * np.sign(s) * np.abs(s) ** (2 / n)
    y = np.where(y > 0, y * (1 - post_flat * np.abs(c) ** 4), y)
    return np.stack([cx + x, cy + y], 1)


def vertebra_at(P: dict, z: float) -> tuple[bool, float]:
    """(inside a vertebral body, not a disc; relative position in the vertebra 0..1)."""
    H = P["lung_height_mm"]
    period = (H + 55) / 12
    ph = (z + 30) / period
    f = ph - math.floor(ph)
    return f > P["disc_mm"] / period, f


# ------------------------------------------------------------------------------------------- fixed tubes
def central_tubes(P: dict) -> dict[str, Tubes]:
    """Great vessels, trachea and main bronchi, ribs, clavicles as capsule lists (z, y, x) mm."""
    H = P["lung_height_mm"]
    zc, za = P["carina_level"] * H, P["arch_level"] * H
    _, cdm, ycm = cavity_axes(P, 0.5 * H)
    ys = P["spine_y_mm"]
    out: dict[str, Tubes] = {}
    tr = P["trachea_r_mm"]
    ty = ys - P["vert_r_mm"] - tr - 14
    trachea = np.array([[-0.5 * H, ty - 10, 0], [0, ty - 4, 0], [zc, ty, 0]])
    rb = np.array([[zc, ty, 0], [zc + 12, ty + 3, -16], [zc + 28, ty + 6, -32]])
    lb = np.array([[zc, ty, 0], [zc + 14, ty + 4, 18], [zc + 32, ty + 8, 38]])
    out["trachea"] = Tubes.concat([Tubes.from_polyline(trachea, tr), Tubes.from_polyline(rb, tr * 0.75),
                                   Tubes.from_polyline(lb, tr * 0.68)])
    ar = P["aorta_r_mm"]
    h = P["heart"]
    ao = np.array([[h["level"] * H - 30, h["y"] + 5, 5], [za + 35, h["y"] - 2, -8], [za + 8, ty - 8, -6],
                   [za, ty + 4, 8], [za + 8, ys - 18, 24], [za + 30, ys - 20, 27], [1.0 * H, ys - 22, 20],
                   [1.4 * H, ys - 28, 6]])
    bra = Tubes.concat([Tubes.from_polyline(np.array([[za + 2, ty - 2, x], [za - 60, ty - 8 + 4 * k, x * 1.6]]), r)
                        for k, (x, r) in enumerate([(-10, 6), (2, 4.5), (14, 4.5)])])
    svc = np.array([[za - 40, ty - 12, -28], [za + 30, h["y"] + 4, -34], [h["level"] * H - 35, h["y"] + 12, -30]])
    pa = np.array([[h["level"] * H - 25, h["y"] - 18, 12], [zc + 18, h["y"] - 10, 20], [zc + 8, ty + 2, 30]])
    rpa = np.array([[zc + 18, h["y"] - 10, 14], [zc + 22, ty + 8, -10], [zc + 28, ty + 14, -36]])
    ivc = np.array([[h["level"] * H + 30, h["y"] + 25, -25], [1.4 * H, h["y"] + 32, -24]])
    out["vessels"] = Tubes.concat([Tubes.from_polyline(ao, ar), bra, Tubes.from_polyline(svc, 9),
                                   Tubes.from_polyline(pa, 13), Tubes.from_polyline(rpa, 10),
                                   Tubes.from_polyline(ivc, 12)])
    out["esophagus"] = Tubes.from_polyline(np.array([[-0.5 * H, ty + tr + 6, 2], [zc, ty + tr + 5, 4],
                                                     [0.8 * H, ys - P["vert_r_mm"] - 8, 14], [1.1 * H, ys - 30, 30]]), 7)
    # ribs: from the costovertebral joint round the cage, sloping down anteriorly
    ribs, cart = [], []
    period = (H + 55) / 12
    for i in range(12):
        z0 = -30 + (i + 0.55) * period
        ext = [0.55, 0.72, 0.8, 0.82, 0.84, 0.86, 0.88, 0.86, 0.8, 0.74, 0.55, 0.42][i]
        for side in (-1, 1):
            phi = np.linspace(0.45, ext * math.pi, 44)
            zz = z0 + P["rib_drop_mm"][i] * (1 - np.cos(phi * 0.9)) / 2 * (0.4 if i == 0 else 1)
            zz = zz - 6 * np.sin(phi * 1.5) * (phi < 1.2)
            cw, cd, yc = np.array([cavity_axes(P, float(z)) for z in zz]).T
            xo = 26
            x = side * (xo + (cw + 5 - xo) * np.sin(phi))
            y = yc + (cd + 6) * np.cos(phi)
            pts = np.stack([zz, y, x], 1)
            head = np.array([[z0 - 2, ys + 0.2 * P["vert_r_mm"], side * (P["vert_r_mm"] + 4)],
                             [z0 - 4, ys + P["vert_r_mm"] + 8, side * (P["vert_r_mm"] + 18)]])
            pts = np.concatenate([head, pts])  # rib head at the vertebral body, neck along the transverse process
            ncart = 0 if i >= 10 else 10
            ribs.append(Tubes.from_polyline(pts[: len(pts) - ncart // 2], P["rib_r_mm"] * (1 + 0.15 * (i > 3))))
            if i < 10:
                end = pts[-ncart // 2 - 1]
                tip_z = -10 + (i + 1) * 0.085 * H if i < 7 else end[0] + 20
                tip = np.array([tip_z, yc[-1] - cd[-1] - 2, side * (14 if i < 7 else cw[-1] * 0.5)])
                cart.append(Tubes.from_polyline(np.stack([end, (end + tip) / 2 + [4, -3, 0], tip]), P["rib_r_mm"] * 0.95))
    out["ribs"] = Tubes.concat(ribs)
    out["cartilage"] = Tubes.concat(cart)
    cw0, cd0, yc0 = cavity_axes(P, -10)
    out["clavicles"] = Tubes.concat([Tubes.from_polyline(np.array(
        [[-18, yc0 - cd0 - 12, s * 18], [-28, yc0 - cd0 - 8, s * 70], [-40, yc0 - 10, s * 140]]), 7) for s in (-1, 1)])
    return out


# ---------------------------------------------------------------------------------------- one axial slice
def slice_fields(P: dict, geom: VolumeGeometry) -> dict[str, Any]:
    """In-plane fields that do not depend on z (fissure and diaphragm heights), computed once per grid."""
    xs = geom.axis_mm(2).astype(np.float32)
    ys = geom.axis_mm(1).astype(np.float32)
    X, Y = np.broadcast_arrays(xs[None, :], ys[:, None])
    right = X < 0
    H = P["lung_height_mm"]
    _, cd, yc = cavity_axes(P, 0.5 * H)
    ant = np.clip((yc - Y) / cd, 0, 1)
    vr = P["vert_r_mm"]
    return {
        "X": X, "Y": Y, "right": right,
        "oblique": np.where(right, oblique_z(P, -1, X, Y), oblique_z(P, 1, X, Y)).astype(np.float32),
        "horizontal": horizontal_z(P, X, Y).astype(np.float32),
        "dome": np.where(right, dome_z(P, -1, X, Y), dome_z(P, 1, X, Y)).astype(np.float32),
        "junction": (1 - 0.65 * ant ** 2).astype(np.float32),
        "gutter": ((X / (vr + 9)) ** 2 + ((Y - P["spine_y_mm"]) / (vr + 14)) ** 2) < 1,
        "oblique_slope": float(np.hypot((np.mean(P["oblique_ant_level"]) - np.mean(P["oblique_post_level"])) * H
                                        / (1.55 * cd), 0.06)),
        "horizontal_slope": float(math.hypot(abs(P["horizontal_tilt"]) + 1e-3, 0.04)),
    }


def draw_slice(P: dict, geom: VolumeGeometry, z: float, label: np.ndarray, lobes: np.ndarray,
               fissure: np.ndarray | None, F: dict[str, Any]) -> None:
    """Everything but the tubes and trees at level ``z`` into label/lobes (uint8) and fissure (0-255)."""
    H = P["lung_height_mm"]
    t = z / H
    w, d = body_axes(P, z)
    cw, cd, yc = cavity_axes(P, z)
    fat = P["fat_mm"]
    yb = 0.0
    label[:] = 0
    # table under the back
    _poly(label, geom, V["table"], np.array([[-260, d + 8], [260, d + 8], [260, d + 22], [-260, d + 22]]))
    # arms and shoulders
    arm_on = -0.25 < t < 0.62
    for s in (-1, 1):
        if arm_on:
            gap = P["arm_gap_mm"] * _smooth(t, -0.1, 0.12)
            ar = 44 - 6 * _smooth(t, 0.0, 0.5)
            ax = s * (w + gap + ar - 10 * (1 - _smooth(t, -0.15, 0.1)))
            _ell(label, geom, V["skin"], ax, yb - 5, ar, ar * 1.05)
            _ell(label, geom, V["subcutaneous_fat"], ax, yb - 5, ar - 2, ar * 1.05 - 2)
            _ell(label, geom, V["muscle"], ax, yb - 5, ar - 9, ar * 1.05 - 10)
            hr = 23 * (1 - _smooth(t, -0.12, 0.02)) + 11
            _ell(label, geom, V["cortical_bone"], ax + s * 3, yb - 2, hr, hr)
            _ell(label, geom, V["cancellous_bone"] if hr > 20 else V["subcutaneous_fat"], ax + s * 3, yb - 2, hr - 2.5, hr - 2.5)
    body = superellipse(0, yb, w, d, 2.4, post_flat=0.25)
    _poly(label, geom, V["skin"], body)
    _poly(label, geom, V["subcutaneous_fat"], superellipse(0, yb, w - 2.2, d - 2.2, 2.4, post_flat=0.25))
    if P["female"] and 0.35 < t < 0.85:
        bs = P["breast_mm"] * math.sin(math.pi * (t - 0.35) / 0.5)
        for s in (-1, 1):
            _ell(label, geom, V["skin"], s * w * 0.42, yb - d + 0.55 * bs, bs * 1.9, bs + 2, -s * 12)
            _ell(label, geom, V["subcutaneous_fat"], s * w * 0.42, yb - d + 0.55 * bs, bs * 1.9 - 2, bs, -s * 12)
            _ell(label, geom, V["muscle"], s * w * 0.42, yb - d + 0.2 * bs, bs * 0.9, bs * 0.45, -s * 12)
    _poly(label, geom, V["muscle"], superellipse(0, yb + 2, w - fat, d - fat * 0.8, 2.4, post_flat=0.25))
    # fat pads between muscle groups: a thin fat plane outside the cavity
    _poly(label, geom, V["subcutaneous_fat"], superellipse(0, yc, cw + 9, cd + 9, P["cavity_shape"]))
    _poly(label, geom, V["muscle"], superellipse(0, yc, cw + 7, cd + 7, P["cavity_shape"]))
    # paraspinal muscles
    ysp = P["spine_y_mm"]
    for s in (-1, 1):
        _ell(label, geom, V["muscle"], s * 30, ysp + 32, 27, 24, -s * 10)
    # scapulae (shoulder blades) behind the ribs in the upper half
    if -0.15 < t < 0.5:
        ln = 1 - _smooth(t, 0.3, 0.5)
        for s in (-1, 1):
            p0 = np.array([s * 58, yc + cd + 24])
            p1 = np.array([s * (58 + 75 * ln + 5), yc + cd - 5 - 30 * ln])
            q = np.stack([p0, p1, p1 + [0, 5], p0 + [0, 5]])
            _poly(label, geom, V["cortical_bone"], q)
    # thoracic cavity (mediastinal fat by default), abdomen under the domes
    cav = superellipse(0, yc, cw, cd, P["cavity_shape"])
    _poly(label, geom, V["mediastinal_fat"], cav)
    inside = label == V["mediastinal_fat"]
    X = F["X"]
    below = inside & (z >= F["dome"])
    if below.any():
        Y = F["Y"]
        label[below] = V["upper_abdomen"]
        liver_edge = -25 + 70 * (1 - float(_smooth(t, 0.8, 1.15))) - 0.4 * (Y - yc)
        liver = below & (X < liver_edge)
        label[liver] = V["liver"]
        # stomach with a gas cap (supine: gas anterior and superior); spleen and bowel stay soft tissue
        sx0, sy0, sz0, sr = 58.0, yc - 18, P["dome_left_level"] * H + 45, (42.0, 34.0, 48.0)
        qz = 1 - ((z - sz0) / sr[2]) ** 2
        if qz > 0:
            st = below & ~liver & ((((X - sx0) / sr[0]) ** 2 + ((Y - sy0) / sr[1]) ** 2) < qz)
            label[st] = V["stomach"]
            label[st & ((Y < sy0 - 10) | (z < sz0 - 25))] = V["gas"]
    if t > 0:
        lung = inside & ~below & ~F["gutter"]
        mh = P["mediastinum_half_mm"] * (0.85 + 0.3 * float(_smooth(t, 0.25, 0.45)))
        lung &= np.abs(X - 4 * float(_smooth(t, 0.3, 0.6))) >= mh * F["junction"]
        ac = P["apex_level"]
        if t < ac:  # apical caps: each lung grows from a point at the apex
            ra = 75.0 * math.sqrt(t / ac)  # a paraboloid cap
            ya = yc + 0.15 * cd
            lung &= ((np.abs(X) - P["apex_offset_mm"] - cw * 0.2) ** 2 + (F["Y"] - ya) ** 2) < ra * ra
        if lung.any():
            sideR = F["right"]
            lower = z > F["oblique"]
            upper_r = lung & sideR & ~lower
            rml = z > F["horizontal"]
            label[lung & lower] = np.where(sideR, np.uint8(LOBES["RLL"]), np.uint8(LOBES["LLL"]))[lung & lower]
            label[upper_r & rml] = LOBES["RML"]
            label[upper_r & ~rml] = LOBES["RUL"]
            label[lung & ~sideR & ~lower] = LOBES["LUL"]
            if fissure is not None:
                fissure[:] = 0
                for zf, s_, msk in ((F["oblique"], F["oblique_slope"], lung), (F["horizontal"], F["horizontal_slope"], upper_r)):
                    sig = math.sqrt((geom.spacing[0] / s_) ** 2 / 12 + 0.25 ** 2)
                    tau_xy = 0.3 * math.sqrt(1 + s_ * s_) / s_
                    amp = min(1.0, tau_xy / (sig * math.sqrt(2 * math.pi)))
                    near = msk & (np.abs(zf - z) < 3.5 * sig * s_)
                    if near.any():
                        dxy = (z - zf[near]) / s_
                        v = np.round(255 * amp * np.exp(-0.5 * (dxy / sig) ** 2)).astype(np.uint8)
                        fissure[near] = np.maximum(fissure[near], v)
    # mediastinum: heart with chambers in its fat, oesophagus, spine
    hs = heart_section(P, z)
    if hs is not None:
        hx, hy, ha, hb, ang = hs
        hw = P["heart"]["wall_mm"]
        _ell(label, geom, V["mediastinal_fat"], hx, hy, ha + 5, hb + 5, ang)
        _ell(label, geom, V["heart"], hx, hy, ha, hb, ang)
        # chambers: left ventricle (left, posterior), right ventricle (anterior, right), atria higher up
        ca, sa = math.cos(math.radians(ang)), math.sin(math.radians(ang))
        for (u_, v_, fa, fb) in ((0.25, 0.15, 0.45, 0.5), (-0.35, -0.35, 0.42, 0.38)):
            cx_, cy_ = hx + ha * u_ * ca - hb * v_ * sa, hy + ha * u_ * sa + hb * v_ * ca
            _ell(label, geom, V["heart_chamber"], cx_, cy_, max(0.0, ha * fa - hw * 0.5), max(0.0, hb * fb - hw * 0.5), ang)
        hz = (z - P["heart"]["level"] * H) / P["heart"]["c"]
        if hz < -0.2:  # atria behind the ventricles at the top of the heart
            _ell(label, geom, V["heart_chamber"], hx - 10, hy + hb * 0.45, ha * 0.45, hb * 0.35, ang)
    # spine: vertebral body (cortex round trabecular bone), canal, posterior arch; discs between bodies
    in_body, f = vertebra_at(P, z)
    vr = P["vert_r_mm"] * (0.85 + 0.25 * _smooth(t, 0, 1.1))
    vy = ysp
    if in_body:
        _ell(label, geom, V["cortical_bone"], 0, vy, vr, vr * 0.85)
        _ell(label, geom, V["cancellous_bone"], 0, vy, vr - 1.3, vr * 0.85 - 1.3)
    else:
        _ell(label, geom, V["cartilage"], 0, vy, vr, vr * 0.85)
    _ell(label, geom, V["cortical_bone"], 0, vy + vr + 9, 11, 10)
    if f > 0.25:  # arch and processes in the upper part of each segment
        arch = np.array([[-13, vy + vr - 2], [13, vy + vr - 2], [20, vy + vr + 18], [4, vy + vr + 24], [3, vy + vr + 42],
                         [-3, vy + vr + 42], [-4, vy + vr + 24], [-20, vy + vr + 18]])
        _poly(label, geom, V["cortical_bone"], arch)
        for s in (-1, 1):
            tp = np.array([[s * 12, vy + vr + 6], [s * 34, vy + vr + 8], [s * 34, vy + vr + 15], [s * 12, vy + vr + 16]])
            _poly(label, geom, V["cortical_bone"], tp)
        inner = np.array([[-9, vy + vr + 2], [9, vy + vr + 2], [15, vy + vr + 16], [2, vy + vr + 20], [1, vy + vr + 38],
                          [-1, vy + vr + 38], [-2, vy + vr + 20], [-15, vy + vr + 16]])
        _poly(label, geom, V["cancellous_bone"], inner)
    _ell(label, geom, V["spinal_canal"], 0, vy + vr + 9, 8.5, 7.5)
    # sternum
    if -0.08 < t < 0.7:
        swid = 24 if t < 0.12 else 14
        sy = yc - cd - 7
        _ell(label, geom, V["cortical_bone"], 0, sy, swid, 6)
        _ell(label, geom, V["cancellous_bone"], 0, sy, swid - 1.4, 4.6)
    lobes[:] = np.where((label >= LOBES["RUL"]) & (label <= LOBES["LLL"]), label, 0)


def draw_volume(P: dict, geom: VolumeGeometry, fissure: bool = True, trees: dict | None = None) -> dict[str, np.ndarray]:
    """Rasterise the anatomy record on ``geom``: label, lobes (lobe id under every lung voxel, vessels
    included), vessel partial-volume weight and fissure weight (0-255)."""
    nz, ny, nx = geom.shape
    label = np.zeros(geom.shape, np.uint8)
    lobes = np.zeros(geom.shape, np.uint8)
    fis = np.zeros(geom.shape, np.uint8) if fissure else None
    F = slice_fields(P, geom)
    for k, z in enumerate(geom.axis_mm(0)):
        draw_slice(P, geom, float(z), label[k], lobes[k], None if fis is None else fis[k], F)
    tubes = central_tubes(P)
    not_lung = np.ones(256, bool)
    not_lung[list(LOBE_IDS)] = False
    soft_ok = np.zeros(256, bool)
    soft_ok[[V["mediastinal_fat"], V["heart"], V["heart_chamber"], V["upper_abdomen"], V["liver"], V["muscle"],
             V["subcutaneous_fat"], V["great_vessel"], V["trachea_bronchus"], V["airway_wall"]]] = True
    soft_ok[list(LOBE_IDS)] = True
    draw_tubes(label, tubes["vessels"], geom, V["great_vessel"])
    draw_tubes(label, tubes["esophagus"], geom, V["esophagus"])
    draw_tubes(label, tubes["trachea"], geom, V["airway_wall"])
    draw_tubes(label, tubes["trachea"], geom, V["trachea_bronchus"], radius_scale=0.8)
    draw_tubes(label, tubes["ribs"], geom, V["cortical_bone"])
    draw_tubes(label, tubes["ribs"], geom, V["cancellous_bone"], radius_scale=0.62)
    draw_tubes(label, tubes["cartilage"], geom, V["cartilage"])
    draw_tubes(label, tubes["clavicles"], geom, V["cortical_bone"])
    draw_tubes(label, tubes["clavicles"], geom, V["cancellous_bone"], radius_scale=0.7)
    lung_mask = ~not_lung
    np.multiply(lobes, lung_mask[label], out=lobes)
    vessel_w = np.zeros(geom.shape, np.uint8)
    if trees is not None:
        # airways are cut at the slice centre (a slab-wide air label would darken thick slices)
        draw_tubes(label, trees["airway"], geom, V["airway_wall"], radius_scale=1.25, where=lung_mask)
        aw_ok = lung_mask.copy()
        aw_ok[V["airway_wall"]] = True
        draw_tubes(label, trees["airway"], geom, V["airway_lumen"], radius_scale=0.75, where=aw_ok)
        lung_now = lung_mask[label]  # parenchyma only: vessels do not overwrite the airways beside them
        draw_tubes(vessel_w, trees["vessel"], geom, None, slab=True, where=lung_now,
                   also=(label, V["pulmonary_vessel"]))
    return {"label": label, "lobes": lobes, "fissure": fis, "vessel_w": vessel_w}


# ----------------------------------------------------------------------------------------------- trees
ATLAS_SPACING = (4.0, 4.0, 4.0)


def lobe_atlas(P: dict) -> tuple[np.ndarray, VolumeGeometry]:
    """The lobes of the whole patient on a coarse 4 mm grid (for the trees, and for placing crops)."""
    H = P["lung_height_mm"]
    nz = int(math.ceil((H * 1.15 + 10) / ATLAS_SPACING[0]))
    g = VolumeGeometry((nz, 72, 96), ATLAS_SPACING, (nz * ATLAS_SPACING[0] / 2 - 5, 0.0, 0.0))
    return draw_volume(P, g, fissure=False)["lobes"], g


def grow_trees(P: dict) -> dict[str, Any]:
    """Vessel (artery + vein per lung) and airway trees: recursive attractor splitting inside each lobe,
    radii by Murray's law (r^3 shared by territory), so they branch, taper and stay continuous in 3D."""
    rng = np.random.default_rng(P["tree_seed"])
    atlas, g = lobe_atlas(P)
    H = P["lung_height_mm"]
    zc = P["carina_level"] * H
    hil = {-1: np.array([zc + 30, 5.0, -42.0]), 1: np.array([zc + 32, 8.0, 44.0])}
    vein = {-1: np.array([zc + 62, -5.0, -38.0]), 1: np.array([zc + 64, 0.0, 40.0])}
    bron = {-1: np.array([zc + 28, P["spine_y_mm"] - P["vert_r_mm"] - 12, -32.0]),
            1: np.array([zc + 32, P["spine_y_mm"] - P["vert_r_mm"] - 8, 38.0])}
    art_segs, vein_segs, air_segs = [], [], []
    n_total = 2600
    vox = g.voxel_mm3
    lobe_vol = {L: int((atlas == L).sum()) for L in LOBE_IDS}
    total = sum(lobe_vol.values()) or 1
    for name, L in LOBES.items():
        idx = np.flatnonzero(atlas == L)
        if len(idx) == 0:
            continue
        side = -1 if name.startswith("R") else 1
        for tree, root, r_root, store in (("artery", hil[side], 5.5, art_segs), ("vein", vein[side], 5.0, vein_segs)):
            n = max(8, int(n_total * lobe_vol[L] / total))
            pick = rng.choice(idx, size=n, replace=True)
            pts = g.to_mm(np.stack(np.unravel_index(pick, g.shape), 1) + rng.uniform(-0.5, 0.5, (n, 3)))
            r_lobe = r_root * (lobe_vol[L] / total) ** (1 / 3)
            segs = _split_tree(rng, root, r_lobe, pts, r_min=0.3)
            store.append(segs)
            if tree == "artery":
                air_segs.append(_airway_from(segs, bron[side], r_scale=0.9, r_min=0.9))
    art = Tubes.concat(art_segs)
    vei = Tubes.concat(vein_segs)
    return {"vessel": Tubes.concat([art, vei]), "airway": Tubes.concat(air_segs), "artery": art, "vein": vei,
            "roots": {"artery": {str(k): v.tolist() for k, v in hil.items()},
                      "vein": {str(k): v.tolist() for k, v in vein.items()}}, "voxel_mm3_atlas": vox}


def _split_tree(rng, root, r0, pts, r_min):
    p0, p1, ra, rb, term, parent = [], [], [], [], [], []
    stack = [(root, r0, pts, -1)]
    while stack:
        start, r, P, par = stack.pop()
        parent.append(par)
        c = P.mean(0)
        n = len(P)
        if n <= 1 or r < r_min:
            end = P[np.argmax(((P - start) ** 2).sum(1))] if n > 1 else c
            p0.append(start); p1.append(end); ra.append(r); rb.append(max(r * 0.7, 0.25)); term.append(True)
            continue
        f = rng.uniform(0.35, 0.6)
        end = start + f * (c - start)
        p0.append(start); p1.append(end); ra.append(r); rb.append(r * 0.92); term.append(False)
        Q = P - c
        ext = Q.max(0) - Q.min(0)
        ax = int(np.argmax(ext * (1 + 0.25 * rng.random(3))))
        proj = Q[:, ax]
        thr = np.median(proj) * rng.uniform(0.0, 1.0) if n > 4 else 0.0
        left = proj < thr
        nl = int(left.sum())
        if nl == 0 or nl == n:
            left = np.arange(n) < n // 2
            nl = n // 2
        for sel, m in ((left, nl), (~left, n - nl)):
            stack.append((end, r * (m / n) ** (1 / 3), P[sel], len(p0) - 1))
    t = Tubes(np.array(p0), np.array(p1), np.array(ra), np.array(rb), np.array(term))
    t.parent = np.array(parent)  # type: ignore[attr-defined]
    return t


def _airway_from(art: Tubes, root, r_scale, r_min) -> Tubes:
    """Bronchi run beside the arteries: the artery tree down to ``r_min``, offset sideways by both radii."""
    keep = (0.5 * (art.r0 + art.r1) * r_scale >= r_min)
    d = art.p1 - art.p0
    up = np.array([1.0, 0.0, 0.0])
    side = np.cross(d, up)
    side /= np.linalg.norm(side, axis=1, keepdims=True) + 1e-9
    off = side * (art.r0 * (1 + r_scale) + 0.8)[:, None]
    p1 = art.p1 + off
    par = art.parent  # type: ignore[attr-defined]
    # each bronchus starts where its parent ended (offset included), so the tree stays connected
    p0 = np.where((par >= 0)[:, None], p1[np.maximum(par, 0)], np.asarray(root, float)[None, :])
    return Tubes(p0[keep], p1[keep], art.r0[keep] * r_scale, art.r1[keep] * r_scale, art.terminal[keep])
