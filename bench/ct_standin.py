"""A "real scanner" stand-in for benchmarks: the chest-CT phantom rendered by a differently configured renderer.

Differences from the default procedural renderer (generators/ct_render.py), each one a thing a learned model must
pick up from the pairs: other tissue HU (denser lungs, brighter fat and muscle, denser bone), coarser and stronger
parenchymal texture, a sharp reconstruction kernel (unsharp mask: edge overshoot), coarser and stronger noise with a
different spectrum (low-pass only, no band-pass), and cupping (a radial beam-hardening bias inside the body).
Sample-then-apply, as everywhere: ``draw_standin_params`` draws, ``render_standin`` applies.
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from generators.ct_render import HU_RANGES, draw_render_params, render_ct

STANDIN_HU: dict[str, tuple[float, float]] = {
    **HU_RANGES,
    "lung_rul": (-835, -800), "lung_rml": (-835, -800), "lung_rll": (-835, -800), "lung_lul": (-835, -800),
    "lung_lll": (-835, -800),
    "subcutaneous_fat": (-95, -75), "mediastinal_fat": (-95, -70),
    "muscle": (55, 70), "heart": (50, 62), "great_vessel": (55, 70), "liver": (62, 75),
    "cortical_bone": (1100, 1300), "cancellous_bone": (280, 420),
    "nodule_solid": (45, 70), "nodule_ground_glass": (-620, -520),
    "table": (-200, -120),
}


def draw_standin_params(rng: np.random.Generator, spacing_mm: float) -> dict[str, Any]:
    p = draw_render_params(rng, spacing_mm)  # the default draw, then this scanner's own values on top
    u = lambda a, b: float(rng.uniform(a, b))  # noqa: E731
    lung = u(*STANDIN_HU["lung_rul"])
    p["hu"] = {name: u(*r) for name, r in STANDIN_HU.items()}
    for n in ("lung_rul", "lung_rml", "lung_rll", "lung_lul", "lung_lll"):
        p["hu"][n] = lung + u(-4, 4)
    p.update(lung_texture_hu=u(28, 40), lung_texture_sigma_mm=u(3.0, 4.5), lung_gradient_hu=u(60, 100),
             psf_sigma_mm=u(0.2, 0.3), noise_hu=u(4, 8), noise_sigma_px=u(0.5, 0.8))
    p["standin"] = {"sharpen": u(0.6, 0.9), "sharpen_sigma_px": u(1.0, 1.4), "lowpass_noise_hu": u(14, 22),
                    "lowpass_noise_sigma_px": u(1.3, 1.8), "cupping_hu": u(40, 70),
                    "noise_seed": int(rng.integers(0, 2**31 - 1))}
    return p


def render_standin(label: np.ndarray, lobes: np.ndarray | None, spacing_mm: float, p: dict[str, Any]) -> np.ndarray:
    img = render_ct(label, lobes, spacing_mm, p)
    s = p["standin"]
    # Sharp kernel: unsharp mask (overshoot at every edge, as bone/lung kernels show).
    blur = cv2.GaussianBlur(img, (0, 0), s["sharpen_sigma_px"])
    img = img + s["sharpen"] * (img - blur)
    # Coarse low-pass noise (another spectrum than the default band-pass noise).
    nrng = np.random.default_rng(s["noise_seed"])
    n = cv2.GaussianBlur(nrng.standard_normal(img.shape, dtype=np.float32), (0, 0), s["lowpass_noise_sigma_px"])
    img += n * (s["lowpass_noise_hu"] / (n.std() + 1e-6))
    # Cupping: inside the body, the centre reads darker than the periphery.
    body = (label > 1).astype(np.float32)
    if body.any():
        dist = cv2.distanceTransform((label > 1).astype(np.uint8), cv2.DIST_L2, 5)
        img -= body * s["cupping_hu"] * (dist / max(float(dist.max()), 1.0))
    np.clip(img, -1024, 3071, out=img)
    return img.astype(np.float32)
