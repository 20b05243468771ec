"""Chest-CT axial-slice phantom layout: anatomy at physical size, five lobes, vessels and airways, nodules.

TorchIO-style: ``draw_anatomy`` draws a flat parameter record from the sample's rng, ``draw_slice`` turns that
record into label maps with no randomness of its own except the vessel/airway scatter, which is drawn from a
child seed recorded in the parameters. Coordinates are millimetres with the origin at the image centre, x to
the image right (the patient's left, radiological convention), y to the image bottom (posterior).
"""
from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from generators.base import register_layout
from schemas.chest_ct import CT_IDS, DOMAIN, LOBE_NAMES, LOBES
from schemas.errors import PlacementError, SpecError
from schemas.findings import LOBE_LEVELS, SIDE_LOBES
from schemas.sample import Layout, SampleRequest

C = CT_IDS
SHIFT = 4  # cv2 sub-pixel bits
SCALE = 1 << SHIFT


class Canvas:
    """A uint8 label canvas addressed in millimetres."""

    def __init__(self, h: int, w: int, spacing: float):
        self.h, self.w, self.sp = h, w, spacing
        self.a = np.zeros((h, w), np.uint8)

    def px(self, x_mm: float, y_mm: float) -> tuple[int, int]:
        return (int(round((x_mm / self.sp + self.w / 2 - 0.5) * SCALE)),
                int(round((y_mm / self.sp + self.h / 2 - 0.5) * SCALE)))

    def ellipse(self, value: int, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0,
                target: np.ndarray | None = None, thickness: int = -1) -> None:
        t = self.a if target is None else target
        axes = (max(1, int(round(ax / self.sp * SCALE))), max(1, int(round(ay / self.sp * SCALE))))
        cv2.ellipse(t, self.px(cx, cy), axes, angle, 0, 360, int(value), thickness, cv2.LINE_8, SHIFT)

    def poly(self, value: int, pts_mm: np.ndarray, target: np.ndarray | None = None) -> None:
        t = self.a if target is None else target
        p = np.empty_like(pts_mm)
        p[:, 0] = (pts_mm[:, 0] / self.sp + self.w / 2 - 0.5) * SCALE
        p[:, 1] = (pts_mm[:, 1] / self.sp + self.h / 2 - 0.5) * SCALE
        cv2.fillPoly(t, [np.round(p).astype(np.int32)], int(value), cv2.LINE_8, SHIFT)

    def line(self, value: int, p0: tuple[float, float], p1: tuple[float, float], width_mm: float,
             target: np.ndarray) -> None:
        th = max(1, int(round(width_mm / self.sp)))
        cv2.line(target, self.px(*p0), self.px(*p1), int(value), th, cv2.LINE_8, SHIFT)

    def mask(self) -> np.ndarray:
        return np.zeros((self.h, self.w), np.uint8)

    def coords(self) -> tuple[np.ndarray, np.ndarray]:
        ys = (np.arange(self.h, dtype=np.float32) + 0.5 - self.h / 2) * self.sp
        xs = (np.arange(self.w, dtype=np.float32) + 0.5 - self.w / 2) * self.sp
        return xs[None, :], ys[:, None]


def superellipse(cx: float, cy: float, ax: float, ay: float, n: float, k: int = 120,
                 post_flat: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    x = ax * np.sign(c) * np.abs(c) ** (2 / n)
    y = ay * np.sign(s) * np.abs(s) ** (2 / n)
    y = np.where(y > 0, y * (1 - post_flat * np.abs(c) ** 4), y)  # a flatter back, as on the table
    return np.stack([cx + x, cy + y], 1)


def _smooth(z: float, lo: float, hi: float) -> float:
    t = min(1.0, max(0.0, (z - lo) / (hi - lo)))
    return t * t * (3 - 2 * t)


def _interp(z: float, zs: list[float], vs: list[float]) -> float:
    return float(np.interp(z, zs, vs))


# ---------------------------------------------------------------------------------------------- parameters
def draw_anatomy(rng: np.random.Generator, level: float) -> dict[str, Any]:
    """Every anatomical parameter of one slice, drawn from the sample's rng (mm, degrees, fractions)."""
    u = lambda a, b: float(rng.uniform(a, b))  # noqa: E731
    habitus = u(0.0, 1.0)  # 0 slim .. 1 broad
    return {
        "level": float(level),
        "body_w": 290 + 80 * habitus + u(-10, 10), "body_d": 195 + 60 * habitus + u(-8, 8),
        "body_n": u(2.3, 2.9), "body_dy": u(-14, -4), "post_flat": u(0.15, 0.35),
        "skin": u(1.6, 2.4), "fat": 5 + 20 * habitus * u(0.6, 1.2), "muscle": u(9, 15),
        "rib_layer": u(6, 9),
        "inspiration": u(0.85, 1.05), "asym": u(-0.05, 0.05),
        "fissure_jitter_r": u(-0.05, 0.05), "fissure_jitter_l": u(-0.05, 0.05),
        "minor_level": u(0.48, 0.56),
        "heart_x": u(12, 26), "heart_rx": u(52, 64), "heart_ry": u(42, 52), "heart_angle": u(-35, -15),
        "spine_r": u(14, 18), "trachea_r": u(8, 11), "aorta_r": u(11, 15),
        "n_ribs": int(rng.integers(7, 10)), "rib_phase": u(0, 1),
        "vessel_seed": int(rng.integers(0, 2**31 - 1)),
        "table_gap": u(2, 10),
    }


# ---------------------------------------------------------------------------------------------- anatomy
def draw_slice(a: dict[str, Any], h: int, w: int, sp: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """Label map and lobe map of one axial slice from an anatomy record (pure but for the recorded vessel seed)."""
    cv = Canvas(h, w, sp)
    z = a["level"]
    bw, bd, by = a["body_w"] / 2, a["body_d"] / 2, a["body_dy"]
    # Upper slices are narrower front-to-back; bases widen a little.
    bd *= _interp(z, [0, 0.3, 1], [0.88, 0.97, 1.03])
    bw *= _interp(z, [0, 0.3, 1], [1.02, 1.0, 0.98])

    # Scanner table: a shallow curved carbon plate under the back, on a flat base.
    back = by + bd
    tg = a["table_gap"]
    plate = np.zeros((h, w), np.uint8)
    cv.ellipse(1, 0, back + tg - 420, 420, 420, target=plate, thickness=max(1, int(round(7 / sp))))
    xs, ys = cv.coords()
    plate &= ((ys > back + tg - 60) & (np.abs(xs) < 215)).astype(np.uint8)
    cv.a[plate > 0] = C["table"]
    cv.poly(C["table"], np.array([[-230, back + tg + 28], [230, back + tg + 28], [230, back + tg + 36],
                                  [-230, back + tg + 36]], float))
    lab = cv.a

    # Body wall: skin -> subcutaneous fat -> muscle -> thoracic cavity (filled with mediastinal fat for now).
    n, pf = a["body_n"], a["post_flat"]
    layers = [("skin", 0.0), ("subcutaneous_fat", a["skin"]), ("muscle", a["skin"] + a["fat"]),
              ("mediastinal_fat", a["skin"] + a["fat"] + a["muscle"] + a["rib_layer"])]
    for name, inset in layers:
        iy = inset * (1.35 if name == "mediastinal_fat" else 1.0)  # thicker posterior wall (paraspinal muscles)
        cv.poly(C[name], superellipse(0, by + (inset - iy) / 2, bw - inset, bd - (inset + iy) / 2, n, post_flat=pf))
    cav_inset = layers[-1][1]
    cw, cd = bw - cav_inset, bd - cav_inset * 1.175
    ccy = by - cav_inset * 0.175
    # Pectoral muscles anteriorly on upper and mid slices.
    if z < 0.75:
        for sgn in (-1, 1):
            cv.ellipse(C["muscle"], sgn * cw * 0.5, ccy - cd - 2, cw * 0.42, a["muscle"] * 0.9, sgn * 8)
        # Re-cut the cavity so the pectorals sit outside it.
        cv.poly(C["mediastinal_fat"], superellipse(0, ccy, cw, cd, n, post_flat=pf * 0.7))

    # Upper abdomen rising into the bases (diaphragm domes): liver on the right, stomach/spleen on the left.
    dome = _smooth(z, 0.8, 1.0)
    if dome > 0:
        cv.ellipse(C["liver"], -cw * 0.3, ccy - cd * 0.05, cw * 0.75 * dome + 1, cd * 0.8 * dome + 1)
        cv.ellipse(C["upper_abdomen"], cw * 0.35, ccy - cd * 0.15, cw * 0.55 * dome + 1, cd * 0.6 * dome + 1)

    # Spine: vertebral body, canal, posterior elements, paraspinal muscles.
    sr = a["spine_r"]
    sy = ccy + cd - sr * 0.9
    for sgn in (-1, 1):
        cv.ellipse(C["muscle"], sgn * sr * 1.6, sy + sr * 1.9, sr * 1.3, sr * 1.1, sgn * -10)
    cv.ellipse(C["cortical_bone"], 0, sy, sr, sr * 0.92)
    cv.ellipse(C["cancellous_bone"], 0, sy, sr - 2.2, sr * 0.92 - 2.2)
    lam = np.array([[-sr * 0.75, sy + sr * 0.8], [sr * 0.75, sy + sr * 0.8], [sr * 0.35, sy + sr * 2.3],
                    [sr * 0.12, sy + sr * 3.4], [-sr * 0.12, sy + sr * 3.4], [-sr * 0.35, sy + sr * 2.3]])
    cv.poly(C["cortical_bone"], lam)
    cv.ellipse(C["spinal_canal"], 0, sy + sr * 1.45, sr * 0.5, sr * 0.45)
    for sgn in (-1, 1):  # transverse processes toward the rib heads
        cv.ellipse(C["cortical_bone"], sgn * sr * 1.25, sy + sr * 1.0, sr * 0.8, sr * 0.28, sgn * 25)

    # Ribs around the cavity wall, as oblique cross-sections (cortex + marrow).
    nr = a["n_ribs"]
    vrng = np.random.default_rng(a["vessel_seed"])
    for sgn in (-1, 1):
        for i in range(nr):
            t = (i + a["rib_phase"]) / nr
            ang = math.radians(-80 + 250 * t)  # from anterior (sternum side) round to the back
            ca, sa = math.cos(ang), math.sin(ang)
            rx = sgn * (cw + a["rib_layer"] * 0.45) * ca
            ry = ccy + (cd + a["rib_layer"] * 0.45) * sa
            if ry > sy + sr * 0.5 and abs(rx) < sr * 2.6:
                continue
            length = float(vrng.uniform(7, 18)) if abs(ca) < 0.5 or sa < 0 else float(vrng.uniform(6, 11))
            tangent = math.degrees(math.atan2(cd * ca, -(sgn * cw) * sa))
            cv.ellipse(C["cortical_bone"], rx, ry, length / 2, 3.4, tangent)
            cv.ellipse(C["cancellous_bone"], rx, ry, max(0.5, length / 2 - 1.3), 2.1, tangent)
    # Scapulae behind the upper ribs.
    if z < 0.55:
        for sgn in (-1, 1):
            cv.ellipse(C["cortical_bone"], sgn * (cw * 0.78), ccy + cd + a["rib_layer"] + 10, 38, 3.0, sgn * -28)
    # Sternum (manubrium wider above), with costal cartilage.
    if z < 0.88:
        swid = 16 if z < 0.3 else 11
        st_y = ccy - cd - a["rib_layer"] * 0.35
        cv.ellipse(C["cortical_bone"], 0, st_y, swid, 6.0)
        cv.ellipse(C["cancellous_bone"], 0, st_y, swid - 1.5, 4.3)

    # Mediastinum: great vessels and trachea above, heart below.
    tr = a["trachea_r"]
    ty = sy - sr - tr - 6
    hs = _smooth(z, 0.42, 0.72) * (1 - 0.45 * _smooth(z, 0.82, 1.0))
    if hs > 0.05:
        hx, hy = a["heart_x"], ccy - cd * 0.18
        cv.ellipse(C["heart"], hx, hy, a["heart_rx"] * hs, a["heart_ry"] * hs, a["heart_angle"])
    ar = a["aorta_r"]
    if z >= 0.25:  # descending aorta, left of the spine
        cv.ellipse(C["great_vessel"], sr * 0.9 + ar * 0.6, sy - sr * 0.6 - ar * 0.4, ar * 0.85, ar * 0.85)
    if 0.18 <= z < 0.27:  # aortic arch
        cv.ellipse(C["great_vessel"], 5, ty - 8, 30, ar * 0.9, 35)
    if 0.27 <= z < 0.6:  # ascending aorta, SVC
        cv.ellipse(C["great_vessel"], -12, ccy - cd * 0.32, ar, ar)
        cv.ellipse(C["great_vessel"], -30, ccy - cd * 0.22, ar * 0.65, ar * 0.75)
    if z < 0.3:  # brachiocephalic veins / branches
        for dx in (-22, -6, 14):
            cv.ellipse(C["great_vessel"], dx, ty - 24, 6.0, 6.0)
    if 0.36 <= z < 0.52:  # pulmonary trunk and arteries toward the hila
        cv.ellipse(C["great_vessel"], 18, ccy - cd * 0.3, ar * 1.05, ar * 1.05)
        cv.ellipse(C["great_vessel"], 0, ccy - cd * 0.05, 42, 8, 12)
    cv.ellipse(C["esophagus"], 6, sy - sr - 7, 7, 5)
    airway_cuts: list[tuple[float, float, float]] = []
    if z < 0.42:
        airway_cuts.append((0.0, ty, tr))
    elif z < 0.55:
        airway_cuts += [(-22.0, ty + 4, tr * 0.65), (24.0, ty + 6, tr * 0.6)]
    for ax_, ay_, r_ in airway_cuts:
        cv.ellipse(C["airway_wall"], ax_, ay_, r_ + 2.0, r_ + 2.0)
        cv.ellipse(C["trachea_bronchus"], ax_, ay_, r_, r_)

    # Lungs: the envelopes inside the cavity, minus everything already in the mediastinum.
    scale = _interp(z, [0, 0.12, 0.35, 1], [0.25, 0.45, 0.95, 1.0]) * a["inspiration"] ** 0.5
    cavity = np.zeros((h, w), np.uint8)
    cv.poly(1, superellipse(0, ccy, cw - 2, cd - 2, n, post_flat=pf * 0.7), target=cavity)
    free = (lab == C["mediastinal_fat"]) & (cavity > 0)
    # Anterior junction line and posterior mediastinum keep the lungs apart.
    band = np.abs(xs) < (9 + 14 * np.clip((ys - (ccy - cd)) / (2 * cd), 0, 1))  # (h, w) via broadcasting
    lobes = np.zeros((h, w), np.uint8)
    params: dict[str, Any] = {"lung_scale": scale}
    for side, sgn in (("right", -1), ("left", 1)):
        asym = 1 + a["asym"] * sgn - (0.06 if side == "left" else 0.0)
        lx = sgn * cw * 0.52
        lax = cw * 0.62 * scale * asym
        lay = cd * 0.98 * _interp(z, [0, 0.3, 1], [0.75, 1.0, 1.0]) * min(1.0, scale + 0.08)
        lcy = ccy + cd * (1 - _interp(z, [0, 0.3, 1], [0.75, 1.0, 1.0]) * min(1.0, scale + 0.08)) * 0.85
        # Work inside the envelope's bounding box only (speed); the envelope is an ellipse in mm.
        c0 = max(0, int((lx - lax) / sp + w / 2) - 1)
        c1 = min(w, int((lx + lax) / sp + w / 2) + 2)
        r0 = max(0, int((lcy - lay) / sp + h / 2) - 1)
        r1 = min(h, int((lcy + lay) / sp + h / 2) + 2)
        bx, byy = xs[:, c0:c1], ys[r0:r1]
        env = ((bx - lx) / lax) ** 2 + ((byy - lcy) / lay) ** 2 < 1
        lung = env & free[r0:r1, c0:c1] & ~band[r0:r1, c0:c1] & ((bx * sgn) > 0)
        # Fissures in lung-local coordinates: u lateral fraction, v anterior->posterior fraction.
        y_ant, y_post = lcy - lay, lcy + lay
        u_ = np.clip((np.abs(bx) - 10) / (abs(lx) + lax - 10), 0, 1)
        v_ = (byy - y_ant) / (y_post - y_ant)
        jit = a["fissure_jitter_r"] if side == "right" else a["fissure_jitter_l"]
        zz = z + (0.03 if side == "left" else 0.0)
        p = _interp(zz, [0, 0.3, 0.42, 0.6, 0.8, 1.0], [1.4, 1.08, 0.8, 0.55, 0.34, 0.2]) + jit
        lower = v_ > p - 0.32 * (u_ - 0.5) + 0.1 * (u_ - 0.5) ** 2
        box = lobes[r0:r1, c0:c1]
        if side == "right":
            upper_id = LOBES["RML"] if z >= a["minor_level"] else LOBES["RUL"]
            box[lung & ~lower] = upper_id
            box[lung & lower] = LOBES["RLL"]
        else:
            box[lung & ~lower] = LOBES["LUL"]
            box[lung & lower] = LOBES["LLL"]
        params[f"{side}_lung"] = {"cx": lx, "cy": lcy, "ax": lax, "ay": lay, "fissure_p": p}
    np.copyto(lab, lobes, where=lobes > 0)

    _draw_vessels_airways(cv, lab, lobes, a, vrng, params)
    return lab, lobes, params


def _draw_vessels_airways(cv: Canvas, lab: np.ndarray, lobes: np.ndarray, a: dict, rng: np.random.Generator,
                          params: dict) -> None:
    """Pulmonary vessels (branching, tapering from the hila, plus cross-sections) and airways with walls."""
    sp = cv.sp
    lung = (lobes > 0).view(np.uint8)
    if cv2.countNonZero(lung) < 50:
        return
    dist = cv2.distanceTransform(lung, cv2.DIST_L2, 3) * sp  # mm to the pleura
    vess = np.zeros_like(lab)
    z = a["level"]
    hilar = _smooth(z, 0.25, 0.45) * (1 - _smooth(z, 0.7, 0.95))
    hh, ww = lab.shape
    deep = dist > 4.0
    half = -(-ww // 2)  # columns x < ww / 2 are the right lung's side (the image's left half)
    line, ellipse = cv.line, cv.ellipse
    uniform, random = rng.uniform, rng.random
    vessel, wall, lumen = C["pulmonary_vessel"], C["airway_wall"], C["airway_lumen"]
    for side, sgn in (("right", -1), ("left", 1)):
        L = params[f"{side}_lung"]
        hx, hy = sgn * 22.0 + sgn * 8, L["cy"] - L["ay"] * 0.1
        # In-plane branching trees from the hilum.
        stack = []
        for _ in range(int(1 + 2 * hilar)):
            ang = math.atan2(uniform(-0.8, 0.8), sgn) + uniform(-0.6, 0.6)
            stack.append((hx, hy, ang, 1.4 + 1.4 * hilar, 18 + 12 * hilar))
        while stack:
            x0, y0, ang, r, ln = stack.pop()
            x1, y1 = x0 + ln * math.cos(ang), y0 + ln * math.sin(ang)
            line(vessel, (x0, y0), (x1, y1), 2 * r, vess)
            if r > 0.55 and len(stack) < 200:
                for d in (-1, 1):
                    stack.append((x1, y1, ang + d * uniform(0.25, 0.6), r * uniform(0.55, 0.72),
                                  ln * uniform(0.5, 0.75)))
        # Cross-sections: dots with radius shrinking toward the periphery; bronchi beside some arteries.
        # (The deep pixels of this side in row-major order, as np.nonzero over the whole image would list them.)
        ys_, xs_ = np.nonzero(deep[:, :half] if sgn < 0 else deep[:, half:])
        if len(xs_) == 0:
            continue
        k = int(rng.integers(45, 80))
        pick = rng.integers(0, len(xs_), size=k)
        off = 0 if sgn < 0 else half
        for px, py in zip((xs_[pick] + off).tolist(), ys_[pick].tolist()):
            x = (px + 0.5 - ww / 2) * sp
            y = (py + 0.5 - hh / 2) * sp
            dh = math.hypot(x - hx, y - hy)
            r = max(0.4, 2.6 * max(0.0, 1 - dh / 100) ** 1.6 + uniform(-0.2, 0.25))
            if dist[py, px] < r + 3:
                continue
            ellipse(vessel, x, y, r, r * uniform(0.8, 1.3), uniform(0, 180), target=vess)
            if r > 1.4 and random() < 0.45:
                bx, by = x + uniform(-1, 1) * (r + 2.5), y + uniform(-1, 1) * (r + 2.5)
                br = r * uniform(0.7, 1.0)
                if dist[min(hh - 1, max(0, int(by / sp + hh / 2))), min(ww - 1, max(0, int(bx / sp + ww / 2)))] > br + 3:
                    ellipse(wall, bx, by, br + 0.9, br + 0.9, target=vess)
                    ellipse(lumen, bx, by, br, br, target=vess)
    np.copyto(lab, vess, where=(vess > 0) & lung.view(bool))


# ---------------------------------------------------------------------------------------------- nodules
def nodule_shape(diameter_mm: float, margin: str, sp: float, rng: np.random.Generator
                 ) -> tuple[dict[str, Any], np.ndarray, tuple[float, float]]:
    """Draw the shape parameters of one nodule and rasterise it with its equivalent diameter calibrated to the request.

    Returns (parameters, boolean patch, centre offset of the patch in px)."""
    k = np.arange(2, 7)
    if margin == "smooth":
        amps = np.where(k == 2, rng.uniform(0.02, 0.08), rng.uniform(0.0, 0.02, size=k.size))
    elif margin == "lobulated":
        amps = rng.uniform(0.0, 0.03, size=k.size)
        amps[rng.integers(1, 4)] = rng.uniform(0.1, 0.17)
    else:  # spiculated: slightly irregular core plus thin spicules
        amps = rng.uniform(0.02, 0.06, size=k.size)
    phases = rng.uniform(0, 2 * np.pi, size=k.size)
    spikes = []
    if margin == "spiculated":
        for _ in range(int(rng.integers(6, 13))):
            spikes.append((float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.35, 0.9)), float(rng.uniform(0.1, 0.18))))
    p = {"margin": margin, "harmonics": [float(v) for v in amps], "phases": [float(v) for v in phases],
         "spicules": spikes, "subpixel": [float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.5, 0.5))]}
    target_area = math.pi * (diameter_mm / 2 / sp) ** 2
    R = diameter_mm / 2 / sp
    for _ in range(6):
        patch, off = rasterise_nodule(R, p)
        area = float(patch.sum())
        if area == 0:
            R *= 1.2
            continue
        ratio = target_area / area
        if abs(ratio - 1) < 0.002:
            break
        R *= math.sqrt(ratio)
    patch, off = rasterise_nodule(R, p)
    p["radius_px"] = float(R)
    return p, patch, off


def rasterise_nodule(R: float, p: dict) -> tuple[np.ndarray, tuple[float, float]]:
    amps, phases = np.asarray(p["harmonics"]), np.asarray(p["phases"])
    reach = R * (1 + amps.sum() + max([s[1] for s in p["spicules"]], default=0)) + 2
    n = int(math.ceil(reach)) * 2 + 1
    c = n // 2
    sx, sy = p["subpixel"]
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    dx, dy = xx - c - sx, yy - c - sy
    rho = np.hypot(dx, dy)
    th = np.arctan2(dy, dx)
    k = np.arange(2, 2 + amps.size, dtype=np.float32)
    r = R * (1 + (amps[:, None, None] * np.cos(k[:, None, None] * th[None] + phases[:, None, None])).sum(0))
    patch = (rho <= r).astype(np.uint8)
    for ang, length, base in p["spicules"]:
        tip = (c + sx + math.cos(ang) * R * (1 + length), c + sy + math.sin(ang) * R * (1 + length))
        b = R * base
        nx, ny = -math.sin(ang), math.cos(ang)
        root = (c + sx + math.cos(ang) * R * 0.8, c + sy + math.sin(ang) * R * 0.8)
        tri = np.array([[root[0] + nx * b, root[1] + ny * b], [root[0] - nx * b, root[1] - ny * b], tip])
        cv2.fillPoly(patch, [np.round(tri * SCALE).astype(np.int32)], 1, cv2.LINE_8, SHIFT)
    return patch.astype(bool), (c + sx, c + sy)


def place_nodules(label: np.ndarray, lobes: np.ndarray, instance: np.ndarray, findings: list[dict], sp: float,
                  rng: np.random.Generator) -> list[dict]:
    """Place each requested nodule wholly inside its lobe, off the pleura and fissures unless juxtapleural."""
    placed: list[dict] = []
    if not findings:
        return placed
    taken = np.zeros(label.shape, np.uint8)
    present = [name for name, k in LOBES.items() if (lobes == k).any()]
    # Lobe edges (pleura, fissures): a pixel whose 3x3 neighbourhood holds another lobe or no lung.
    edges = cv2.erode(lobes, np.ones((3, 3), np.uint8)) != cv2.dilate(lobes, np.ones((3, 3), np.uint8))
    for i, f in enumerate(findings, start=1):
        shape_p, patch, (ox, oy) = nodule_shape(f["diameter_mm"], f["margin"], sp, rng)
        ys, xs = np.nonzero(patch)
        reach = float(np.hypot(xs - ox, ys - oy).max()) + 0.75
        margin_px = max(1.5, 1.5 / sp)
        loc = f["location"]
        choices = present if loc == "any" else [n for n in SIDE_LOBES[loc] if n in present] if loc in SIDE_LOBES \
            else [loc]
        region = ((lobes > 0) & ~edges & (taken == 0)).astype(np.uint8)
        dist = cv2.distanceTransform(region, cv2.DIST_L2, 5)
        if f.get("juxtapleural"):
            ok = (dist >= reach) & (dist <= reach + 1.5)
        else:
            ok = dist >= reach + margin_px
        room = np.bincount(lobes[ok], minlength=256)  # candidate pixels per lobe id, in one pass
        sizes = np.array([room[LOBES[name]] for name in choices], float)
        if sizes.sum() == 0:
            where = "any lobe" if loc == "any" else loc
            raise PlacementError(f"no room for a {f['diameter_mm']:.1f} mm nodule in {where} on this slice")
        # "any" picks a lobe in proportion to the room it has for this nodule.
        li = int(rng.choice(len(choices), p=sizes / sizes.sum())) if len(choices) > 1 else 0
        lobe = choices[li]
        cy_, cx_ = np.nonzero(ok & (lobes == LOBES[lobe]))
        j = int(rng.integers(len(cx_)))
        cx, cy = int(cx_[j]), int(cy_[j])
        y0, x0 = cy - int(round(oy)), cx - int(round(ox))
        ph, pw = patch.shape
        sl = (slice(y0, y0 + ph), slice(x0, x0 + pw))
        if y0 < 0 or x0 < 0 or y0 + ph > label.shape[0] or x0 + pw > label.shape[1]:
            raise PlacementError("nodule patch leaves the image")
        kind = f["kind"]
        if kind == "solid":
            label[sl][patch] = C["nodule_solid"]
        else:
            label[sl][patch] = C["nodule_ground_glass"]
            if kind == "part_solid":
                frac = float(rng.uniform(0.35, 0.6))
                shape_p["solid_fraction"] = frac
                core, (cox, coy) = rasterise_nodule(shape_p["radius_px"] * frac,
                                                    {**shape_p, "spicules": [], "subpixel": shape_p["subpixel"]})
                cy0, cx0 = int(round(oy - coy)), int(round(ox - cox))
                cp = np.zeros_like(patch)
                cp[cy0:cy0 + core.shape[0], cx0:cx0 + core.shape[1]] = core[: ph - cy0, : pw - cx0]
                cp &= patch
                label[sl][cp] = C["nodule_solid"]
        instance[sl][patch] = i
        taken[max(0, y0 - 2):y0 + ph + 2, max(0, x0 - 2):x0 + pw + 2] = 1
        placed.append({**f, "instance": i, "lobe": lobe, "requested_location": f["location"],
                       "center_px": [cx + ox - round(ox), cy + oy - round(oy)],
                       "center_mm": [round((cx + 0.5 - label.shape[1] / 2) * sp, 3),
                                     round((cy + 0.5 - label.shape[0] / 2) * sp, 3)],
                       "shape": shape_p})
    return placed


# ---------------------------------------------------------------------------------------------- layout
def choose_level(request: SampleRequest, spec_levels: tuple[float, float], rng: np.random.Generator) -> float:
    """The planned level if every requested lobe shows there; else a level drawn where they all show."""
    lo, hi = spec_levels
    for f in request.findings:
        a, b = LOBE_LEVELS[f["location"]]
        lo, hi = max(lo, a), min(hi, b)
    if lo > hi:
        raise PlacementError("the requested lobes never share one slice level")
    level = request.params["slice_level"]
    return level if lo <= level <= hi else float(rng.uniform(lo, hi))


# Levels where each lobe is at its largest on the phantom: later placement tries draw from here.
LOBE_CORE_LEVELS: dict[str, tuple[float, float]] = {
    "RUL": (0.12, 0.4), "RML": (0.7, 0.9), "RLL": (0.65, 0.95), "LUL": (0.2, 0.6), "LLL": (0.65, 0.95),
    "any": (0.45, 0.8), "right": (0.45, 0.8), "left": (0.45, 0.8),
}
LEVEL_TRIES = 4


# Registered for the domain by generators.ct_insert (phantom or the user's scan).
def chest_ct_layout(spec, request: SampleRequest, rng: np.random.Generator) -> Layout:
    """Anatomy at the planned level, then the findings; when they do not fit, a bounded, recorded resample of the
    level inside the range where the requested lobes are largest (and still inside the spec's slice range)."""
    h, w = request.size
    sp = request.spacing_mm
    level = choose_level(request, tuple(spec.slice_level), rng)
    tries = []
    for t in range(LEVEL_TRIES):
        anatomy = draw_anatomy(rng, level)
        label, lobes, geo = draw_slice(anatomy, h, w, sp)
        instance = np.zeros((h, w), np.uint16)
        try:
            placed = place_nodules(label, lobes, instance, request.findings, sp, rng)
            break
        except PlacementError as e:
            tries.append({"level": level, "error": str(e)})
            if t == LEVEL_TRIES - 1:
                raise
            lo, hi = spec.slice_level
            for f in request.findings:
                a, b = LOBE_CORE_LEVELS[f["location"]]
                lo, hi = max(lo, a), min(hi, b)
            if lo > hi:  # the core ranges do not meet the spec's range: stay where the lobes show at all
                level = choose_level(request, tuple(spec.slice_level), rng)
            else:
                level = float(rng.uniform(lo, hi))
    return Layout(label=label, instance=instance, spacing_mm=sp, findings=placed,
                  params={"anatomy": anatomy, "geometry": geo, "slice_level": level, "level_tries": tries},
                  extras={"lobes": lobes})


# ----------------------------------------------------------------------------------------------------------------
# ControlNet hooks (generators.controlnet looks them up through the domain description): prompt text, the
# CT-only option hu_window, and grey -> HU. Pure numpy, so importing them loads no torch.
# HU windows: grey g in [0, 1] -> HU = low + g * (high - low). Every preset starts at or above -1024 HU so every
# output fits the store's 16-bit PNG of HU + 1024; "lung" keeps the clinical lung-window width (1500 HU).
HU_WINDOWS = {"lung": (-1024.0, 476.0), "mediastinal": (-160.0, 240.0), "wide": (-1024.0, 1024.0)}
HU_MIN, HU_MAX = -1024.0, 3071.0


def _num(v: Any) -> str:
    return f"{round(float(v), 1):g}"


def describe_ct_finding(f: dict) -> str:
    """'8 mm spiculated solid nodule in the right upper lobe' from a placed CT finding."""
    kind = str(f.get("kind", "solid")).replace("_", "-")
    words = [f"{_num(f['diameter_mm'])} mm" if f.get("diameter_mm") else "", str(f.get("margin") or ""), kind, "nodule"]
    text = " ".join(w for w in words if w)
    lobe = f.get("lobe") or f.get("location")
    if lobe in LOBE_NAMES:
        text += " in the " + LOBE_NAMES[lobe].split(" (")[0]
    return text


def _hu_window(v: Any) -> tuple[str, tuple[float, float]]:
    if isinstance(v, str) and v in HU_WINDOWS:
        return v, HU_WINDOWS[v]
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                            for x in v):
        lo, hi = float(v[0]), float(v[1])
        if HU_MIN <= lo < hi <= HU_MAX:
            return "custom", (lo, hi)
    raise SpecError(f"option hu_window: {v!r} is not accepted; accepted: {', '.join(HU_WINDOWS)} or [low, high] HU "
                    f"with {HU_MIN:g} <= low < high <= {HU_MAX:g}")


class ControlNetHooks:
    """What the controlnet renderer needs to know about chest CT."""

    default_prompt = "axial chest CT slice, {window} window, {findings}"
    prompt_fields = frozenset({"findings", "window"})

    def configure(self, options: dict[str, Any]) -> dict[str, Any]:
        if "color" in options:
            raise SpecError("option color applies to the surface domain only; CT images are HU")
        name, window = _hu_window(options.get("hu_window", "lung"))
        return {"window_name": name, "hu_window": window}

    def image_size(self, spec: Any, options: dict[str, Any], state: dict[str, Any]) -> tuple[int, int]:
        return spec.image.size, spec.image.size

    def prompt_fields_for(self, layout: Layout, state: dict[str, Any]) -> dict[str, str]:
        findings = ", ".join(describe_ct_finding(f) for f in layout.findings) or "no nodule"
        return {"findings": findings, "window": state["window_name"]}

    def to_image(self, rgb: np.ndarray, state: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        lo, hi = state["hu_window"]
        grey = rgb.mean(axis=2, dtype=np.float32)
        image = (lo + grey * (hi - lo)).astype(np.float32)
        return image, {"type": "hu", "grey": "mean of R, G, B", "hu_window": [lo, hi],
                       "window_name": state["window_name"], "mapping": f"HU = {lo:g} + g * {hi - lo:g}"}


CONTROLNET = ControlNetHooks()
