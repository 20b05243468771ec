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
from generators.ct_models import nonzero_yx, strand, wavy_path
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


_SE_TRIG: dict[int, tuple[np.ndarray, ...]] = {}


def superellipse(cx: float, cy: float, ax: float, ay: float, n: float, k: int = 120,
                 post_flat: float = 0.0) -> np.ndarray:
    if k not in _SE_TRIG:  # the angles' cosines and sines, computed once per point count
        t = np.linspace(0, 2 * np.pi, k, endpoint=False)
        c, s = np.cos(t), np.sin(t)
        _SE_TRIG[k] = (np.sign(c), np.abs(c), np.sign(s), np.abs(s), np.abs(c) ** 4)
    sc, ac, ss, as_, c4 = _SE_TRIG[k]
    x = ax * sc * ac ** (2 / n)
    y = ay * ss * as_ ** (2 / n)
    y = np.where(y > 0, y * (1 - post_flat * c4), y)  # a flatter back, as on the table
    return np.stack([cx + x, cy + y], 1)


def wavy(pts: np.ndarray, cx: float, cy: float, harmonics: list) -> np.ndarray:
    """Perturb a closed outline's radius round (cx, cy) by low-order harmonics [[amp, phase], ...] (orders 2..)."""
    d = pts - (cx, cy)
    th = np.arctan2(d[:, 1], d[:, 0])
    f = np.ones(len(pts))
    for k, (amp, ph) in enumerate(harmonics, start=2):
        f += amp * np.cos(k * th + ph)
    return np.stack([cx + d[:, 0] * f, cy + d[:, 1] * f], 1)


def _bbox(mask: np.ndarray, pad: int = 0) -> tuple[slice, slice] | None:
    """Row and column slices of the non-zero pixels' bounding box of a uint8 mask, grown by ``pad`` (None if empty)."""
    x, y, bw, bh = cv2.boundingRect(mask)
    if bw == 0:
        return None
    h, w = mask.shape
    return slice(max(0, y - pad), min(h, y + bh + pad)), slice(max(0, x - pad), min(w, x + bw + pad))


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
        # Realism of the wall and mediastinum (shared with the volume phantom's ranges where it has them).
        "body_harmonics": [[u(0.0, 0.018), u(0, 2 * math.pi)] for _ in range(3)],  # orders 2, 3, 4
        "female": bool(rng.random() < 0.5), "breast_mm": u(18, 42),
        "rib_gaps": [u(0.65, 1.35) for _ in range(12)], "rib_len": [u(0.75, 1.3) for _ in range(12)],
        "rib_half_mm": [u(2.2, 3.3) for _ in range(12)], "rib_cortex_mm": u(0.7, 1.0),
        "fat_planes": [[u(-70, 250), u(0.35, 0.75)] for _ in range(3)],
        "heart_harmonics": [[u(0.0, 0.05), u(0, 2 * math.pi)] for _ in range(3)],
        "lv_wall": u(0.22, 0.3), "septum_angle": u(-12, 12),
        "vessel_density": u(0.8, 1.2), "back_mm": u(8, 22),
    }


# ---------------------------------------------------------------------------------------------- anatomy
def draw_slice(a: dict[str, Any], h: int, w: int, sp: float, maps: dict | None = None
               ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Label map and lobe map of one axial slice from an anatomy record (pure but for the recorded vessel seed).

    ``maps``, when given, receives render-only detail the class table does not name: ``chambers`` (uint8, 1
    inside the heart's blood pool, the cavities of the ventricles and atria, whose unenhanced blood is a little
    less dense than the myocardium)."""
    cv = Canvas(h, w, sp)
    z = a["level"]
    bw, bd, by = a["body_w"] / 2, a["body_d"] / 2, a["body_dy"]
    # Upper slices are narrower front-to-back; bases widen a little.
    bd *= _interp(z, [0, 0.3, 1], [0.88, 0.97, 1.03])
    bw *= _interp(z, [0, 0.3, 1], [1.02, 1.0, 0.98])

    # Scanner table: a shallow curved carbon plate under the back, on a flat base.
    back = by + bd + a.get("back_mm", 0.0)
    tg = a["table_gap"]
    plate = np.zeros((h, w), np.uint8)
    cv.ellipse(1, 0, back + tg - 420, 420, 420, target=plate, thickness=max(1, int(round(7 / sp))))
    xs, ys = cv.coords()
    plate[~(ys[:, 0] > back + tg - 60)] = 0
    plate[:, ~(np.abs(xs[0]) < 215)] = 0
    pb = _bbox(plate)
    if pb is not None:
        cv.a[pb][plate[pb] > 0] = C["table"]
    cv.poly(C["table"], np.array([[-230, back + tg + 28], [230, back + tg + 28], [230, back + tg + 36],
                                  [-230, back + tg + 36]], float))
    lab = cv.a

    # Body wall: skin -> subcutaneous fat -> muscle -> thoracic cavity (filled with mediastinal fat for now).
    n, pf = a["body_n"], a["post_flat"]
    harm = a.get("body_harmonics", [])
    layers = [("skin", 0.0), ("subcutaneous_fat", a["skin"]), ("muscle", a["skin"] + a["fat"]),
              ("mediastinal_fat", a["skin"] + a["fat"] + a["muscle"] + a["rib_layer"])]
    cav_inset = layers[-1][1]
    cw, cd = bw - cav_inset, bd - cav_inset * 1.175
    ccy = by - cav_inset * 0.175
    # Shoulder girdle near the apex: the trunk widens into the shoulders (arms raised, out of the slice).
    sh = 1 - _smooth(z, 0.05, 0.3)
    for name, inset in layers:
        iy = inset * (1.35 if name == "mediastinal_fat" else 1.0)  # thicker posterior wall (paraspinal muscles)
        if name == "muscle" and a.get("female") and 0.3 < z < 0.9:  # breasts: a soft bulge over the pectorals
            bs = a["breast_mm"] * math.sin(math.pi * (z - 0.3) / 0.6)
            for sgn in (-1, 1):
                bx_, by_ = sgn * bw * 0.42, by - bd * 0.9
                cv.ellipse(C["skin"], bx_, by_, bs * 2.2 + 8, bs * 0.75 + 2, sgn * 14)
                cv.ellipse(C["subcutaneous_fat"], bx_, by_, bs * 2.2 + 6, bs * 0.75, sgn * 14)
                cv.ellipse(C["muscle"], bx_, by_ - bs * 0.3, bs * 0.9, bs * 0.25, sgn * 14)  # glandular tissue
        # shoulders: the trunk is wider and squarer toward the apex (arms raised, out of the slice)
        bk = 0.0 if name == "mediastinal_fat" else a.get("back_mm", 0.0)
        pts = superellipse(0, by + (inset - iy) / 2 + bk / 2, bw * (1 + 0.1 * sh) - inset, bd - (inset + iy) / 2 + bk / 2,
                           n + 0.8 * sh, post_flat=pf)
        cv.poly(C[name], wavy(pts, 0, by, harm) if name != "mediastinal_fat" else pts)
        if name == "muscle":
            # Fat planes between the muscle groups (pectoralis, serratus, latissimus): thin fat arcs.
            fp = np.zeros((h, w), np.uint8)
            th_px = max(1, int(round(1.2 / sp)))
            for ang, frac in a.get("fat_planes", []):
                ax_ = (cw + a["rib_layer"] + a["muscle"] * frac) / sp * SCALE
                ay_ = (cd + a["rib_layer"] + a["muscle"] * frac) / sp * SCALE
                for sgn in (-1, 1):  # an arc of about 50 degrees, mirrored
                    mid = ang if sgn > 0 else 180 - ang
                    cv2.ellipse(fp, cv.px(0, ccy), (int(ax_), int(ay_)), 0, mid - 25, mid + 25, 1, th_px,
                                cv2.LINE_8, SHIFT)
            fb = _bbox(fp)
            if fb is not None:
                cv.a[fb][(fp[fb] > 0) & (cv.a[fb] == C["muscle"])] = C["subcutaneous_fat"]
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
    for sgn in (-1, 1):  # erector spinae, with a fat streak between its columns
        cv.ellipse(C["muscle"], sgn * sr * 1.7, sy + sr * 2.3, sr * 1.45, sr * 1.5, sgn * -10)
        cv.line(C["subcutaneous_fat"], (sgn * sr * 1.6, sy + sr * 1.5), (sgn * sr * 2.1, sy + sr * 3.4), 1.0, cv.a)
    # Vertebra: a thin cortex (about 1 mm) round trabecular bone, as in the volume phantom.
    cx_ = 1.0
    cv.ellipse(C["cortical_bone"], 0, sy, sr, sr * 0.92)
    cv.ellipse(C["cancellous_bone"], 0, sy, sr - cx_, sr * 0.92 - cx_)
    # Posterior arch: a bony ring round the canal (pedicles, laminae), a thin spinous process, transverse processes.
    cv.ellipse(C["cortical_bone"], 0, sy + sr * 1.45, sr * 0.5 + 3.2, sr * 0.45 + 3.0)
    spin = np.array([[-3.2, sy + sr * 1.9], [3.2, sy + sr * 1.9], [1.8, sy + sr * 3.3], [-1.8, sy + sr * 3.3]])
    cv.poly(C["cortical_bone"], spin)
    for sgn in (-1, 1):  # transverse processes toward the rib heads
        cv.ellipse(C["cortical_bone"], sgn * sr * 1.15, sy + sr * 1.3, sr * 0.75, sr * 0.2, sgn * 22)
        cv.ellipse(C["cancellous_bone"], sgn * sr * 1.15, sy + sr * 1.3, sr * 0.75 - 1.0, max(0.4, sr * 0.2 - 0.9),
                   sgn * 22)
    cv.ellipse(C["spinal_canal"], 0, sy + sr * 1.45, sr * 0.5, sr * 0.45)

    # Ribs around the cavity wall, as oblique cross-sections (cortex + marrow).
    # Ribs: oblique cuts of sloping ribs, irregularly spaced, long laterally and anteriorly (the rib runs
    # steeply through the slice there), short beside the spine; thin cortex round marrow.
    nr = a["n_ribs"]
    vrng = np.random.default_rng(a["vessel_seed"])
    gaps = np.asarray(a.get("rib_gaps", [1.0] * 12), float)
    lens = a.get("rib_len", [1.0] * 12)
    halfs = a.get("rib_half_mm", [3.4] * 12)
    ctx = a.get("rib_cortex_mm", 1.3)
    for sgn in (-1, 1):
        g = np.roll(gaps, 0 if sgn < 0 else 5)[:nr]
        pos = (np.cumsum(g) - g[0] + a["rib_phase"] * g[0]) / g.sum()
        for i in range(nr):
            t = float(pos[i])
            ang = math.radians(-80 + 250 * t)  # from anterior (sternum side) round to the back
            ca, sa = math.cos(ang), math.sin(ang)
            rx = sgn * (cw + a["rib_layer"] * 0.45) * ca
            ry = ccy + (cd + a["rib_layer"] * 0.45) * sa
            if ry > sy + sr * 0.5 and abs(rx) < sr * 2.6:
                continue
            j = (i + (0 if sgn < 0 else 6)) % 12
            base = 22 - 14 * max(0.0, sa) ** 2 if sa > -0.2 else 16  # posterior ribs cut nearly square
            length = max(6.0, base * lens[j] * (0.8 + 0.4 * z))
            half = halfs[j]
            tangent = math.degrees(math.atan2(cd * ca, -(sgn * cw) * sa))
            cv.ellipse(C["cortical_bone"], rx, ry, length / 2, half, tangent)
            cv.ellipse(C["cancellous_bone"], rx, ry, max(0.5, length / 2 - ctx), max(0.4, half - ctx), tangent)
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
        hrx, hry, hang = a["heart_rx"] * hs, a["heart_ry"] * hs, a["heart_angle"]
        # Heart: a rounded outline (not an ellipse), in its pericardial fat; ventricles below, atria above.
        t_ = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        ca_, sa_ = math.cos(math.radians(hang)), math.sin(math.radians(hang))
        ex, ey = hrx * np.cos(t_), hry * np.sin(t_)
        outline = np.stack([hx + ex * ca_ - ey * sa_, hy + ex * sa_ + ey * ca_], 1)
        outline = wavy(outline, hx, hy, a.get("heart_harmonics", []))
        cv.poly(C["heart"], outline)
        # Epicardial fat in the interventricular and atrioventricular grooves (where the coronaries run).
        for du, dv, ln_, ang_ in ((0.0, -0.95, 0.45, hang + 70 + a.get("septum_angle", 0.0)), (-0.6, 0.55, 0.5, hang - 30)):
            gx, gy = hx + hrx * du * ca_ - hry * dv * sa_, hy + hrx * du * sa_ + hry * dv * ca_
            cv.ellipse(C["mediastinal_fat"], gx, gy, hrx * ln_ * 0.5, 2.5, ang_)
        if maps is not None:
            ch = np.zeros((h, w), np.uint8)
            hz = (z - 0.42) / 0.4  # 0 at the top of the heart .. 1 at its base on the diaphragm
            wall = a.get("lv_wall", 0.25)
            sep = math.radians(a.get("septum_angle", 0.0))

            def at(u_, v_):  # heart-local fractions -> mm
                return hx + hrx * u_ * ca_ - hry * v_ * sa_, hy + hrx * u_ * sa_ + hry * v_ * ca_

            if hz < 0.45:  # atria and the aortic root
                for u_, v_, fa, fb in ((0.3, 0.35, 0.35, 0.32), (-0.3, 0.3, 0.38, 0.34)):
                    cv.ellipse(1, *at(u_, v_), hrx * fa, hry * fb, hang, target=ch)
            if hz > 0.2:  # left ventricle (thick wall), right ventricle (thin wall), septum between
                cv.ellipse(1, *at(0.32, 0.05), hrx * (0.55 - wall), hry * (0.62 - wall), hang + 20, target=ch)
                cv.ellipse(1, *at(-0.42, -0.2), hrx * 0.4, hry * 0.42, hang - 10 + math.degrees(sep), target=ch)
            if hz > 0.6:  # inferior cava entering the right atrium
                cv.ellipse(1, *at(-0.55, 0.45), hrx * 0.2, hry * 0.25, 0, target=ch)
            cb = _bbox(ch)
            if cb is not None:
                ch[cb] &= (lab[cb] == C["heart"]).astype(np.uint8)
            maps["chambers"] = ch
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
        free = (lab[r0:r1, c0:c1] == C["mediastinal_fat"]) & (cavity[r0:r1, c0:c1] > 0)
        # Anterior junction line and posterior mediastinum keep the lungs apart.
        band = np.abs(bx) < (9 + 14 * np.clip((byy - (ccy - cd)) / (2 * cd), 0, 1))
        lung = env & free & ~band & ((bx * sgn) > 0)
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
    lb = _bbox(lobes)
    if lb is not None:
        np.copyto(lab[lb], lobes[lb], where=lobes[lb] > 0)
    # Toward the apex the thoracic cavity narrows to the lung apices and the mediastinum between them: what lies
    # lateral to the central mediastinum there is chest wall (scalene, serratus, subscapularis muscle), not fat.
    # The mediastinum keeps its fat inside a rounded outline round the trachea, and each lung a thin rim of
    # extrapleural fat (about 2 mm).
    x_wall = 26.0 + 220.0 * _smooth(z, 0.22, 0.45)
    if x_wall < bw:
        my, mry = ccy + cd * 0.1, cd * 1.05
        keep = (xs / x_wall) ** 2 + ((ys - my) / mry) ** 2 < 1
        r_px = max(1, int(round(2.0 / sp)))
        rim = cv2.dilate((lobes > 0).astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r_px + 1,) * 2))
        wall = (lab == C["mediastinal_fat"]) & ~keep & (rim == 0) & (cavity > 0)
        lab[wall] = C["muscle"]

    _draw_vessels_airways(cv, lab, lobes, a, vrng, params)
    return lab, lobes, params


def _draw_vessels_airways(cv: Canvas, lab: np.ndarray, lobes: np.ndarray, a: dict, rng: np.random.Generator,
                          params: dict) -> None:
    """Pulmonary vessels and airways as an axial plane cuts them (as in the volume phantom): round or oval dots
    where a vessel crosses the slice, short tapering stubs where one runs obliquely through it, calibre falling
    from the hilum to the periphery (Murray-like) and fewer, finer vessels toward the pleura; bronchi (wall +
    lumen) beside the larger arteries. The renderer gives each vessel its partial-volume contrast."""
    sp = cv.sp
    h, w = lab.shape
    if cv2.countNonZero(lobes) < 50:
        return
    # Distance to the pleura inside the lungs' bounding box (grown by 2 px of background: the same values as a
    # whole-frame transform, since every path to the background crosses that ring).
    lb = _bbox(lobes, 2)
    r0, c0 = lb[0].start, lb[1].start
    lung = (lobes[lb] > 0).astype(np.uint8)
    dist = cv2.distanceTransform(lung, cv2.DIST_L2, 3) * sp  # mm to the pleura
    dh, dw = dist.shape
    vess = np.zeros_like(lab)
    z = a["level"]
    hilar = _smooth(z, 0.25, 0.45) * (1 - _smooth(z, 0.7, 0.95))
    dens = a.get("vessel_density", 1.0)

    def dist_many(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        px_ = (x / sp + w / 2).astype(np.int64) - c0  # int() of each value, as for one point
        py_ = (y / sp + h / 2).astype(np.int64) - r0
        ok = (px_ >= 0) & (px_ < dw) & (py_ >= 0) & (py_ < dh)
        out = np.zeros(len(px_))
        out[ok] = dist[py_[ok], px_[ok]]
        return out

    def dist_at(x: float, y: float) -> float:
        return float(dist_many(np.array([x]), np.array([y]))[0])

    ell = cv2.ellipse
    cen = lambda x, y: (int(round((x / sp + w / 2 - 0.5) * SCALE)), int(round((y / sp + h / 2 - 0.5) * SCALE)))  # noqa: E731
    axl = lambda v: max(1, int(round(v / sp * SCALE)))  # noqa: E731
    vid, wid, lid = C["pulmonary_vessel"], C["airway_wall"], C["airway_lumen"]
    for side, sgn in (("right", -1), ("left", 1)):
        L = params[f"{side}_lung"]
        hx, hy = sgn * 30.0, L["cy"] - L["ay"] * 0.1
        reach_mm = abs(hx) + abs(L["cx"]) + L["ax"]
        # Lobar and segmental vessels near the hilum, cut obliquely: short, thick stubs pointing outward.
        for _ in range(int(rng.integers(2, 5) * (0.4 + hilar))):
            ang = math.atan2(rng.uniform(-0.9, 0.9), sgn) + rng.uniform(-0.5, 0.5)
            d0 = rng.uniform(8, 30)
            x0, y0 = hx + d0 * math.cos(ang), hy + d0 * math.sin(ang)
            r = rng.uniform(2.0, 4.2) * (0.6 + 0.4 * hilar)
            ln = rng.uniform(4, 16)
            if dist_at(x0, y0) < r + 2:
                continue
            pts = wavy_path(x0, y0, ang, ln, 0.15, rng.standard_normal(4))
            ok = dist_many(pts[:, 0], pts[:, 1]) > r + 2
            k_ok = int(np.argmin(ok)) if not ok.all() else len(pts)
            if k_ok >= 2:
                strand(vess, (pts[:k_ok] / sp + (w / 2 - 0.5, h / 2 - 0.5)), 2 * r / sp, 1.4 * r / sp, vid, SHIFT)
        # Cross-sections: candidates drawn round the hilum, denser near it; calibre tapering outward.
        k = int(rng.integers(110, 170) * dens)
        d = reach_mm * rng.random(k) ** 0.6
        ang = math.atan2(0.0, sgn) + rng.uniform(-1.7, 1.7, k)
        xs_, ys_ = hx + d * np.cos(ang), hy + d * np.sin(ang) * 0.9
        rr = np.maximum(0.35, 2.6 * np.clip(1 - d / reach_mm, 0, 1) ** 1.5 * rng.uniform(0.6, 1.25, k))
        oblique = rng.random(k) < 0.3
        aspect = np.where(oblique, rng.uniform(1.8, 4.5, k), rng.uniform(1.0, 1.35, k))
        orient = np.degrees(ang) + rng.uniform(-35, 35, k)
        dps = dist_many(xs_, ys_)
        keep = ~(dps < rr * aspect + 1.0)
        rr = np.where(keep & (dps < 12) & (rr > 0.9), rr * 0.6, rr)  # subpleural vessels are fine
        # Fixed-point centres and axes of every kept cross-section at once (as Canvas.ellipse rounds them).
        ki = np.flatnonzero(keep)
        qx = np.round((xs_[ki] / sp + w / 2 - 0.5) * SCALE).astype(np.int64).tolist()
        qy = np.round((ys_[ki] / sp + h / 2 - 0.5) * SCALE).astype(np.int64).tolist()
        qa = np.maximum(1, np.round(rr[ki] * aspect[ki] / sp * SCALE)).astype(np.int64).tolist()
        qb = np.maximum(1, np.round(rr[ki] / sp * SCALE)).astype(np.int64).tolist()
        for n_, i in enumerate(ki.tolist()):
            ell(vess, (qx[n_], qy[n_]), (qa[n_], qb[n_]), float(orient[i]), 0, 360, vid, -1, cv2.LINE_8, SHIFT)
            r = float(rr[i])
            if r > 1.3 and rng.random() < 0.4:  # the bronchus beside an artery
                x, y = float(xs_[i]), float(ys_[i])
                off = rng.uniform(-1, 1, 2)
                off *= (r + 1.4) / (np.hypot(*off) + 1e-6)
                bx, by = x + off[0] * 1.3, y + off[1] * 1.3
                br = r * rng.uniform(0.6, 0.95)
                if dist_at(bx, by) > br + 3:
                    c_ = cen(bx, by)
                    ell(vess, c_, (axl(br + 0.6), axl(br + 0.6)), 0.0, 0, 360, wid, -1, cv2.LINE_8, SHIFT)
                    ell(vess, c_, (axl(br), axl(br)), 0.0, 0, 360, lid, -1, cv2.LINE_8, SHIFT)
    vb, lv = vess[lb], lab[lb]
    np.copyto(lv, vb, where=(vb > 0) & (lobes[lb] > 0))


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
    if margin == "spiculated":  # thin, tapering, slightly wavy strands (angle, length / R, half-width / R, wobble)
        for _ in range(int(rng.integers(6, 13))):
            spikes.append((float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.5, 1.4)), float(rng.uniform(0.06, 0.12)),
                           *[round(float(v), 4) for v in rng.standard_normal(3)]))
    p = {"margin": margin, "harmonics": [float(v) for v in amps], "phases": [float(v) for v in phases],
         "spicules": spikes, "subpixel": [float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.5, 0.5))],
         # solid core of a part-solid nodule: its own irregular outline, off centre (fractions of the radius)
         "core": {"harmonics": [float(v) for v in rng.uniform(0.04, 0.14, 3)],
                  "phases": [float(v) for v in rng.uniform(0, 2 * np.pi, 3)],
                  "offset": [float(v) for v in rng.uniform(-0.22, 0.22, 2)]}}
    target_area = math.pi * (diameter_mm / 2 / sp) ** 2
    R = calibrate_radius(diameter_mm / 2 / sp, p, target_area)
    patch, off = rasterise_nodule(R, p)
    p["radius_px"] = float(R)
    return p, patch, off


def _polar_grid(R_max: float, p: dict) -> tuple[np.ndarray, np.ndarray, int, float, float]:
    """Distance ``rho`` from the nodule centre and the outline factor ``f(theta)`` (radius = R f) on a square grid
    wide enough for radius ``R_max``: the per-pixel values ``rasterise_nodule`` computes at any R (same offsets)."""
    amps, phases = np.asarray(p["harmonics"]), np.asarray(p["phases"])
    reach = R_max * (1 + amps.sum() + max([s[1] for s in p["spicules"]], default=0)) + 2
    n = int(math.ceil(reach)) * 2 + 1
    c = n // 2
    sx, sy = p["subpixel"]
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    dx, dy = xx - c - sx, yy - c - sy
    rho = np.hypot(dx, dy)
    th = np.arctan2(dy, dx)
    k = np.arange(2, 2 + amps.size, dtype=np.float32)
    f = 1 + (amps[:, None, None] * np.cos(k[:, None, None] * th[None] + phases[:, None, None])).sum(0)
    return rho, f, c, sx, sy


def calibrate_radius(R0: float, p: dict, target_area: float) -> float:
    """The radius R (px) at which the rasterised nodule covers ``target_area`` pixels (rounded).

    Without spicules, area(R) = #{pixels: rho / f(theta) <= R}: one polar grid and a partial sort give the R
    between the n-th and (n+1)-th smallest rho / f, so the area is the target to the pixel. With spicules (whose
    strands widen with R) a few ratio steps on the same grid: only the strands are redrawn per step."""
    rho, f, c, sx, sy = _polar_grid(R0 * 1.6 + 2, p)
    q = (rho / f).ravel()
    m = max(1, int(round(target_area)))
    if m >= q.size:
        return float(R0)
    lo, hi = np.partition(q, (m - 1, m))[[m - 1, m]]
    if not p["spicules"]:
        return float((lo + hi) / 2)
    # Spicules add area in proportion to R^2 as well (their length and width scale with R): start from the core's
    # radius shrunk by the first step's ratio, then proportional steps.
    R, best = float((lo + hi) / 2), (math.inf, R0)
    for _ in range(8):
        patch = (q <= R).reshape(rho.shape).astype(np.uint8)
        _draw_spicules(patch, R, p, c + sx, c + sy)
        area = float(cv2.countNonZero(patch))
        if area == 0:
            R *= 1.2
            continue
        best = min(best, (abs(area - target_area), R))
        if abs(area - target_area) <= max(1.5, 0.005 * target_area):  # 0.25 % of the diameter at most
            break
        R = min(R * math.sqrt(target_area / area), R0 * 1.6)
    return float(best[1])


def _draw_spicules(patch: np.ndarray, R: float, p: dict, cx: float, cy: float) -> None:
    """The spicules as tapering, slightly wavy strands (``ct_models.wavy_path`` + ``strand``, all at once)."""
    spk = p["spicules"]
    if not spk:
        return
    ang = np.array([s[0] for s in spk], float)
    length = np.array([s[1] for s in spk], float)
    base = np.array([s[2] for s in spk], float)
    wob = np.array([list(s[3:6]) if len(s) >= 6 else [0.0, 0.0, 0.0] for s in spk], float)
    r0 = R * 0.8
    ca, sa = np.cos(ang), np.sin(ang)
    ln = R * (1 + length) - r0  # wavy_path with 4 points: t = 0, 1/3, 2/3, 1; lateral = cumsum(wobble) * 0.25 L / 4
    t = np.linspace(0.0, 1.0, 4)
    lat = np.cumsum(np.concatenate([np.zeros((len(spk), 1)), wob], 1), 1) * (0.25 * ln / 4)[:, None]
    x = (cx + ca * r0)[:, None] + ca[:, None] * t[None] * ln[:, None] - sa[:, None] * lat
    y = (cy + sa * r0)[:, None] + sa[:, None] * t[None] * ln[:, None] + ca[:, None] * lat
    q = np.round(np.stack([x, y], 2) * SCALE).astype(np.int64).tolist()
    for i in range(len(spk)):
        w0, w1 = 2 * R * base[i], 0.6
        qi = q[i]
        for j in range(3):
            wd = max(1, int(round(w0 + (w1 - w0) * (j + 0.5) / 3)))
            cv2.line(patch, tuple(qi[j]), tuple(qi[j + 1]), 1, wd, cv2.LINE_8, SHIFT)


def rasterise_nodule(R: float, p: dict) -> tuple[np.ndarray, tuple[float, float]]:
    rho, f, c, sx, sy = _polar_grid(R, p)  # ct_insert uses the same reach rule
    r = R * f
    patch = (rho <= r).astype(np.uint8)
    _draw_spicules(patch, R, p, c + sx, c + sy)
    return patch.astype(bool), (c + sx, c + sy)


def core_patch(patch: np.ndarray, shape_p: dict, off: tuple[float, float], frac: float) -> np.ndarray:
    """The solid core of a part-solid nodule: radius ``frac`` of the nodule's, its own irregular outline, off
    centre by ``shape_p['core']['offset']`` radii, clipped to the nodule."""
    ox, oy = off
    cp_ = shape_p.get("core") or {"harmonics": [], "phases": [], "offset": [0.0, 0.0]}
    R = shape_p["radius_px"]
    q = {"harmonics": cp_["harmonics"], "phases": cp_["phases"], "spicules": [], "subpixel": shape_p["subpixel"]}
    core, (cox, coy) = rasterise_nodule(R * frac, q)
    dx, dy = (int(round(v * R)) for v in cp_["offset"])
    cy0, cx0 = int(round(oy - coy)) + dy, int(round(ox - cox)) + dx
    ph, pw = patch.shape
    cp = np.zeros_like(patch)
    y0, x0 = max(0, cy0), max(0, cx0)
    y1, x1 = min(ph, cy0 + core.shape[0]), min(pw, cx0 + core.shape[1])
    if y1 > y0 and x1 > x0:
        cp[y0:y1, x0:x1] = core[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0]
    cp &= patch
    if not cp.any():  # never an empty core
        cp[int(round(oy)), int(round(ox))] = patch[int(round(oy)), int(round(ox))]
    return cp


def place_nodules(label: np.ndarray, lobes: np.ndarray, instance: np.ndarray, findings: list[dict], sp: float,
                  rng: np.random.Generator) -> list[dict]:
    """Place each requested nodule wholly inside its lobe, off the pleura and fissures unless juxtapleural."""
    placed: list[dict] = []
    if not findings:
        return placed
    # Everything below runs in the lungs' bounding box grown by 2 px of background (distances to the background
    # are then the same as over the whole frame); positions come back in frame pixels.
    lb = _bbox(lobes, 2)
    if lb is None:
        lb = (slice(0, lobes.shape[0]), slice(0, lobes.shape[1]))
    r_off, c_off = lb[0].start, lb[1].start
    lob = lobes[lb]
    taken = np.zeros(lob.shape, np.uint8)
    counts = np.bincount(lob.ravel(), minlength=256)
    present = [name for name, k in LOBES.items() if counts[k]]
    # Lobe edges (pleura, fissures): a pixel whose 3x3 neighbourhood holds another lobe or no lung.
    edges = cv2.erode(lob, np.ones((3, 3), np.uint8)) != cv2.dilate(lob, np.ones((3, 3), np.uint8))
    for i, f in enumerate(findings, start=1):
        shape_p, patch, (ox, oy) = nodule_shape(f["diameter_mm"], f["margin"], sp, rng)
        ys, xs = np.nonzero(patch)
        reach = float(np.hypot(xs - ox, ys - oy).max()) + 0.75
        margin_px = max(1.5, 1.5 / sp)
        loc = f["location"]
        choices = present if loc == "any" else [n for n in SIDE_LOBES[loc] if n in present] if loc in SIDE_LOBES \
            else [loc]
        region = ((lob > 0) & ~edges & (taken == 0)).astype(np.uint8)
        dist = cv2.distanceTransform(region, cv2.DIST_L2, 5)
        if f.get("juxtapleural"):
            ok = (dist >= reach) & (dist <= reach + 1.5)
        else:
            ok = dist >= reach + margin_px
        room = np.bincount(lob[ok], minlength=256)  # candidate pixels per lobe id, in one pass
        sizes = np.array([room[LOBES[name]] for name in choices], float)
        if sizes.sum() == 0:
            where = "any lobe" if loc == "any" else loc
            raise PlacementError(f"no room for a {f['diameter_mm']:.1f} mm nodule in {where} on this slice")
        # "any" picks a lobe in proportion to the room it has for this nodule.
        li = int(rng.choice(len(choices), p=sizes / sizes.sum())) if len(choices) > 1 else 0
        lobe = choices[li]
        cy_, cx_ = nonzero_yx(ok & (lob == LOBES[lobe]))
        j = int(rng.integers(len(cx_)))
        cx, cy = int(cx_[j]) + c_off, int(cy_[j]) + r_off
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
                label[sl][core_patch(patch, shape_p, (ox, oy), frac)] = C["nodule_solid"]
        instance[sl][patch] = i
        taken[max(0, y0 - 2 - r_off):max(0, y0 + ph + 2 - r_off), max(0, x0 - 2 - c_off):max(0, x0 + pw + 2 - c_off)] = 1
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
        maps: dict[str, np.ndarray] = {}
        label, lobes, geo = draw_slice(anatomy, h, w, sp, maps)
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
                  extras={"lobes": lobes, **maps})


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
