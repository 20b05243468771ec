"""Procedural CT renderer: label map -> float32 Hounsfield units.

Sample-then-apply: ``draw_render_params`` draws every parameter (tissue HU from published ranges, texture,
blur, noise) from the sample's rng into a plain record; ``render_ct`` applies it with no randomness of its
own except noise fields drawn from a child seed stored in that record.
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from generators.base import Renderer, register_renderer
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
    "cortical_bone": (900, 1400),
    "cancellous_bone": (220, 380),
    "mediastinal_fat": (-110, -85),
    "heart": (38, 55),
    "great_vessel": (38, 55),
    "trachea_bronchus": (-1000, -985),
    "esophagus": (25, 45),
    "lung_rul": (-880, -840),
    "lung_rml": (-880, -840),
    "lung_rll": (-880, -840),
    "lung_lul": (-880, -840),
    "lung_lll": (-880, -840),
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
IS_SOFT = np.zeros(256, bool)
IS_SOFT[[C["muscle"], C["liver"], C["heart"]]] = True


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
    for n in ("lung_rul", "lung_rml", "lung_rll", "lung_lul", "lung_lll"):
        hu[n] = lung_hu + u(-6, 6)
    return {
        "hu": hu,
        "lung_gradient_hu": u(25, 70),  # dependent (posterior) lung is denser
        "lung_texture_hu": u(12, 24), "lung_texture_sigma_mm": u(1.2, 2.5),
        "soft_texture_hu": u(3, 8),
        "fissure_hu": u(120, 260),
        "gg_texture_hu": u(20, 45),
        "psf_sigma_mm": u(0.35, 0.6),  # scanner point spread (also gives partial-volume edges)
        "noise_hu": u(10, 22),  # std of correlated quantum noise
        "noise_sigma_px": u(0.6, 1.0),
        "noise_seed": int(rng.integers(0, 2**31 - 1)),
    }


def render_ct(label: np.ndarray, lobes: np.ndarray | None, spacing_mm: float, p: dict[str, Any]) -> np.ndarray:
    h, w = label.shape
    lut = np.full(256, -1000.0, np.float32)
    for name, v in p["hu"].items():
        lut[C[name]] = v
    img = lookup(label, lut)
    nrng = np.random.default_rng(p["noise_seed"])

    lung = lookup(label, IS_LUNG)
    # Parenchymal texture and the gravity gradient (denser posteriorly), only in the lungs.
    tex = nrng.standard_normal((h // 4 + 1, w // 4 + 1), dtype=np.float32)
    tex = cv2.resize(tex, (w, h), interpolation=cv2.INTER_CUBIC)
    s = max(0.5, p["lung_texture_sigma_mm"] / spacing_mm / 4)
    tex = cv2.GaussianBlur(tex, (0, 0), s)
    tex *= p["lung_texture_hu"] / (tex.std() + 1e-6)
    ys = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    img += np.where(lung, tex + p["lung_gradient_hu"] * (ys - 0.5), np.float32(0))
    gg = label == C["nodule_ground_glass"]
    if gg.any():
        img += gg * tex * (p["gg_texture_hu"] / max(p["lung_texture_hu"], 1e-3))
    img += lookup(label, IS_SOFT) * tex * (p["soft_texture_hu"] / max(p["lung_texture_hu"], 1e-3))

    # Fissures: thin dense lines where two lobes meet.
    if lobes is not None and lobes.any():
        er = cv2.erode(lobes, np.ones((3, 3), np.uint8))
        di = cv2.dilate(lobes, np.ones((3, 3), np.uint8))
        fis = (er != di) & (er > 0) & (di > 0) & lung
        img[fis] += p["fissure_hu"] * 0.6

    # Scanner blur (partial volume at edges), then spatially correlated noise.
    img = cv2.GaussianBlur(img, (0, 0), max(0.3, p["psf_sigma_mm"] / spacing_mm))
    n = nrng.standard_normal((h, w), dtype=np.float32)
    n = cv2.GaussianBlur(n, (0, 0), p["noise_sigma_px"]) - 0.5 * cv2.GaussianBlur(n, (0, 0), 3 * p["noise_sigma_px"])
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
        return render_ct(layout.label, layout.extras.get("lobes"), layout.spacing_mm, p), p
