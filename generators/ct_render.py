"""Procedural CT renderer: label map -> float32 Hounsfield units.

Sample-then-apply: ``draw_render_params`` draws every parameter (tissue HU from published ranges, texture,
blur, noise) from the sample's rng into a plain record; ``render_ct`` applies it with no randomness of its
own except noise fields drawn from a child seed stored in that record.
"""
from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from generators.base import Renderer, register_renderer
from generators.ct_models import band_noise, soft_occupancy
from schemas.chest_ct import CT_IDS
from schemas.sample import Layout

C = CT_IDS

# Published HU ranges (../shared/docs/DOMAIN.md); each sample draws its own value inside the range.
HU_RANGES: dict[str, tuple[float, float]] = {
    "air_outside": (-1005, -995),
    "table": (60, 180),
    "skin": (30, 60),
    "subcutaneous_fat": (-115, -90),
    "muscle": (35, 55),
    "cortical_bone": (800, 1200),
    "cancellous_bone": (165, 235),
    "mediastinal_fat": (-110, -85),
    "heart": (38, 55),
    "great_vessel": (38, 55),
    "trachea_bronchus": (-1000, -985),
    "esophagus": (25, 45),
    "lung_rul": (-875, -830),
    "lung_rml": (-875, -830),
    "lung_rll": (-875, -830),
    "lung_lul": (-875, -830),
    "lung_lll": (-875, -830),
    "pulmonary_vessel": (30, 50),
    "airway_lumen": (-1000, -960),
    "airway_wall": (10, 50),
    "nodule_solid": (25, 55),
    "nodule_ground_glass": (-690, -560),
    "liver": (52, 66),
    "spinal_canal": (15, 32),
    "upper_abdomen": (25, 45),
}
LUNG_IDS = [C[n] for n in ("lung_rul", "lung_rml", "lung_rll", "lung_lul", "lung_lll")]
IS_LUNG = np.zeros(256, bool)
IS_LUNG[LUNG_IDS] = True
# Parenchyma as the background of what sits in it (vessels and nodules are composited over it).
IS_PAREN = IS_LUNG.copy()
IS_PAREN[[C["pulmonary_vessel"], C["nodule_solid"], C["nodule_ground_glass"]]] = True
IS_SOFT = np.zeros(256, bool)
IS_SOFT[[C["muscle"], C["liver"], C["heart"], C["upper_abdomen"], C["great_vessel"]]] = True
IS_BONE = np.zeros(256, bool)
IS_BONE[C["cancellous_bone"]] = True
LUNG_NAMES = ("lung_rul", "lung_rml", "lung_rll", "lung_lul", "lung_lll")


def lookup(label: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``table[label]`` for a 256-entry table: cv2.LUT (several times faster than numpy's fancy indexing) for uint8
    label maps, numpy otherwise; the same values either way (boolean tables come back boolean)."""
    if label.dtype == np.uint8 and label.ndim == 2 and table.shape == (256,):
        if table.dtype == np.bool_:
            return cv2.LUT(label, table.view(np.uint8)).view(np.bool_)
        if table.dtype in (np.float32, np.uint8, np.int32, np.float64):
            return cv2.LUT(label, table)
    return table[label]


def draw_render_params(rng: np.random.Generator, spacing_mm: float) -> dict[str, Any]:
    u = lambda a, b: float(rng.uniform(a, b))  # noqa: E731
    lung_hu = u(*HU_RANGES["lung_rul"])
    hu = {name: u(*r) for name, r in HU_RANGES.items()}
    for n in LUNG_NAMES:
        hu[n] = lung_hu + u(-2, 2)
    return {
        "hu": hu,
        "lung_gradient_hu": u(25, 60),  # dependent (posterior) lung is denser
        "lung_texture_hu": u(10, 18), "lung_texture_sigma_mm": u(1.2, 2.5),
        # sub-resolution vessels and interlobular septa: sparse faint specks (positive skew of the parenchyma)
        "micro_hu": u(60, 130), "micro_mm": u(0.9, 1.4),
        "soft_texture_hu": u(2, 5),
        "bone_texture_hu": u(80, 130),  # trabecular pattern (the volume phantom's |field| - 0.8 model)
        "chamber_drop_hu": u(8, 16),  # unenhanced blood pool below the myocardium
        "vessel_contrast": [u(0.55, 0.75), u(0.9, 1.0)],  # partial-volume weight range of pulmonary vessels
        "fissure_hu": u(120, 260),
        "gg_texture_hu": u(30, 55), "nodule_texture_hu": u(6, 14),
        "solid_edge_mm": u(0.25, 0.5), "gg_edge_mm": u(0.7, 1.4),  # soft, irregular nodule edges
        "psf_sigma_mm": u(0.35, 0.6),  # scanner point spread (also gives partial-volume edges)
        "noise_hu": u(16, 26),  # std of correlated quantum noise (low-dose screening: 15-30 HU in soft tissue)
        # inner Gaussian of the band-pass NPS (outer 3x); at least 0.65 px: coarse grids still correlate neighbours
        "noise_sigma_px": max(0.65, u(0.5, 0.75) / spacing_mm),
        "nps_low_cut": u(0.8, 0.95),
        "noise_seed": int(rng.integers(0, 2**31 - 1)),
    }


def _field(nrng: np.random.Generator, h: int, w: int, step: float, sigma: float) -> np.ndarray:
    """Unit-variance Gaussian field with cells of ``step`` px, cubic-upsampled to (h, w)."""
    st = max(1.0, step)
    f = nrng.standard_normal((int(h / st) + 2, int(w / st) + 2), dtype=np.float32)
    if sigma > 0:
        f = cv2.GaussianBlur(f, (0, 0), sigma)
    f = cv2.resize(f, (int(round(f.shape[1] * st)), int(round(f.shape[0] * st))), interpolation=cv2.INTER_CUBIC)
    f = f[:h, :w]
    return f * np.float32(1.0 / (f.std() + 1e-6))


def _composite_nodules(img: np.ndarray, label: np.ndarray, sp: float, p: dict[str, Any], tex: np.ndarray) -> None:
    """Nodules over the parenchyma with soft, irregular edges (0.5 occupancy on the label boundary) and internal
    texture; a part-solid nodule's solid core blends into its ground-glass halo."""
    nod = ((label == C["nodule_solid"]) | (label == C["nodule_ground_glass"])).astype(np.uint8)
    x, y, bw, bh = cv2.boundingRect(nod)
    if bw == 0:
        return
    pad = int(math.ceil(4 * max(p["gg_edge_mm"], p["solid_edge_mm"]) / sp)) + 2
    h, w = label.shape
    y0, y1, x0, x1 = max(0, y - pad), min(h, y + bh + pad), max(0, x - pad), min(w, x + bw + pad)
    m = nod[y0:y1, x0:x1]
    lab = label[y0:y1, x0:x1]
    n, comp = cv2.connectedComponents(m, connectivity=8)
    has_gg = np.zeros(n, bool)
    has_gg[np.unique(comp[lab == C["nodule_ground_glass"]])] = True
    has_gg[0] = False
    win, tw = img[y0:y1, x0:x1], tex[y0:y1, x0:x1]
    hu_s, hu_g = p["hu"]["nodule_solid"], p["hu"]["nodule_ground_glass"]
    for gg in (True, False):
        sel = (has_gg[comp] if gg else (~has_gg[comp] & (comp > 0))).astype(np.uint8)
        if not sel.any():
            continue
        din = cv2.distanceTransform(sel, cv2.DIST_L2, 5)
        dout = cv2.distanceTransform(1 - sel, cv2.DIST_L2, 5)
        d_mm = np.where(sel > 0, 0.5 - din, dout - 0.5) * np.float32(sp)
        edge = p["gg_edge_mm"] if gg else p["solid_edge_mm"]
        occ = soft_occupancy(d_mm, edge, tw).astype(np.float32)
        if gg:
            core = (lab == C["nodule_solid"]).astype(np.float32) * sel
            core = np.maximum(core, cv2.GaussianBlur(core, (0, 0), max(0.5, 0.6 / sp)))  # soft outside the core only
            target = hu_g + tw * p["gg_texture_hu"] + core * (hu_s - hu_g)
        else:
            target = hu_s + tw * p["nodule_texture_hu"]
        win += occ * (target - win)


def render_ct(label: np.ndarray, lobes: np.ndarray | None, spacing_mm: float, p: dict[str, Any],
              chambers: np.ndarray | None = None) -> np.ndarray:
    """HU image of one slice. ``chambers`` (optional, from the layout): the heart's blood pool."""
    h, w = label.shape
    sp = spacing_mm
    lut = np.full(256, -1000.0, np.float32)
    for name, v in p["hu"].items():
        lut[C[name]] = v
    lung_hu = float(np.mean([p["hu"][n] for n in LUNG_NAMES]))
    for name in ("pulmonary_vessel", "nodule_solid", "nodule_ground_glass"):
        lut[C[name]] = lung_hu  # composited below
    img = lookup(label, lut)
    nrng = np.random.default_rng(p["noise_seed"])

    paren = lookup(label, IS_PAREN)
    # Parenchymal texture, sub-resolution specks and the gravity gradient (denser posteriorly), in the lungs.
    tex = _field(nrng, h, w, 4.0, max(0.5, p["lung_texture_sigma_mm"] / sp / 4))
    fine = _field(nrng, h, w, max(1.0, p.get("micro_mm", 1.0) / sp), 0.0)
    ys = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    lungv = tex * np.float32(p["lung_texture_hu"]) + np.float32(p["lung_gradient_hu"]) * (ys - 0.5)
    lungv += np.maximum(fine - 1.6, 0) * np.float32(p.get("micro_hu", 0.0))
    img += np.where(paren, lungv, np.float32(0))
    img += lookup(label, IS_SOFT) * tex * np.float32(p["soft_texture_hu"])
    bone = lookup(label, IS_BONE)
    if "bone_texture_hu" in p and bone.any():  # trabecular pattern from the fine field (cells of about 1 mm)
        img += bone * (np.abs(fine) - 0.8) * np.float32(p["bone_texture_hu"])
    if chambers is not None and "chamber_drop_hu" in p:
        x, y, bw, bh = cv2.boundingRect(chambers)
        if bw:
            sl = (slice(y, y + bh), slice(x, x + bw))
            img[sl] -= (chambers[sl] > 0) * (label[sl] == C["heart"]) * np.float32(p["chamber_drop_hu"])

    # Pulmonary vessels: partial-volume weight from the calibre (distance to the vessel's edge), times a slowly
    # varying contrast (vessels cut obliquely or off-centre in the slab are fainter).
    ves = (label == C["pulmonary_vessel"]).astype(np.uint8)
    if ves.any():
        x, y, bw, bh = cv2.boundingRect(ves)
        sl = (slice(y, y + bh), slice(x, x + bw))
        d = cv2.distanceTransform(np.pad(ves[sl], 1), cv2.DIST_L2, 3)[1:-1, 1:-1] * np.float32(sp)
        c0, c1 = p.get("vessel_contrast", (1.0, 1.0))
        wgt = np.where(d > 0, np.clip(0.15 + 0.6 * d, 0, 1), 0) * (c0 + (c1 - c0) * np.clip(0.5 + 0.5 * fine[sl], 0, 1))
        win = img[sl]
        win += wgt.astype(np.float32) * (np.float32(p["hu"]["pulmonary_vessel"]) - win)

    # Fissures: thin dense lines where two lobes meet.
    if lobes is not None and lobes.any():
        er = cv2.erode(lobes, np.ones((3, 3), np.uint8))
        di = cv2.dilate(lobes, np.ones((3, 3), np.uint8))
        fis = (er != di) & (er > 0) & (di > 0) & IS_LUNG[label]
        img[fis] += p["fissure_hu"] * 0.6

    _composite_nodules(img, label, sp, p, tex)

    # Scanner blur (partial volume at edges), then noise with a CT-like NPS (shared with the volume renderer).
    img = cv2.GaussianBlur(img, (0, 0), max(0.3, p["psf_sigma_mm"] / sp))
    n = nrng.standard_normal((h, w), dtype=np.float32)
    n = band_noise(n, p["noise_sigma_px"], p.get("nps_low_cut", 0.5))
    n *= p["noise_hu"] / (n.std() + 1e-6)
    img += n
    np.clip(img, -1024, 3071, out=img)
    return img


@register_renderer
class ProceduralCT(Renderer):
    """Default CT backend: needs nothing but a CPU."""

    name = "procedural"
    version = "1.0"
    domains = ("chest_ct",)
    options_accepted = ()

    def render(self, layout: Layout, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        p = draw_render_params(rng, layout.spacing_mm)
        return render_ct(layout.label, layout.extras.get("lobes"), layout.spacing_mm, p,
                         chambers=layout.extras.get("chambers")), p
