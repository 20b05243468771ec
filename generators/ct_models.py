"""Imaging and tissue models shared by the chest-CT slice renderer (``ct_render``) and the volume renderer
(``ct_volume_render``), so both phantoms age together.

- ``band_noise``: quantum noise with a CT-like noise power spectrum (difference of Gaussians: low at DC, a peak
  at mid frequencies near 0.2-0.35 cycles/mm for the sigmas drawn by the renderers, rolling off above).
- ``trabecular``: the fine random pattern of cancellous bone (|Gaussian field| - 0.8, so thin bright struts on a
  darker marrow background).
- ``soft_occupancy``: how much of a pixel a finding fills, from the signed distance to its label boundary
  (mm, positive outside) perturbed by a texture field: a logistic edge, 0.5 on the label boundary, so the label
  stays the measured extent while the image edge is soft and irregular.
- ``strand``: a thin, tapering, slightly wavy polyline (spicules, vessel stubs) rasterised with cv2.
"""
from __future__ import annotations

import math

import cv2
import numpy as np


def band_noise(white: np.ndarray, sigma_px: float, low_cut: float) -> np.ndarray:
    """Band-pass filtered white noise (unnormalised): G(sigma) - low_cut * G(3 sigma)."""
    return cv2.GaussianBlur(white, (0, 0), sigma_px) - low_cut * cv2.GaussianBlur(white, (0, 0), 3 * sigma_px)


def trabecular(coarse: np.ndarray, step: int, h: int, w: int) -> np.ndarray:
    """Trabecular pattern on an (h, w) grid from a coarse white field of cell ``step`` px (mean about 0)."""
    b = cv2.resize(coarse, (coarse.shape[1] * step, coarse.shape[0] * step), interpolation=cv2.INTER_CUBIC)[:h, :w]
    return np.abs(b) - 0.8


def soft_occupancy(d_mm: np.ndarray, edge_mm: float, tex: np.ndarray | float = 0.0) -> np.ndarray:
    """Logistic occupancy 1 / (1 + exp(d' / (0.45 edge))) with d' = d + 0.35 edge * tex (d: mm outside > 0)."""
    d = d_mm + 0.35 * edge_mm * tex
    return 1.0 / (1.0 + np.exp(np.clip(d / (0.45 * edge_mm), -30, 30)))


def strand(img: np.ndarray, pts_px: np.ndarray, w0_px: float, w1_px: float, value: int, shift: int = 4) -> None:
    """Draw a polyline whose width tapers linearly from ``w0_px`` to ``w1_px`` (at least 1 px), in place."""
    s = 1 << shift
    q = np.round(np.asarray(pts_px, float) * s).astype(np.int64)
    n = len(q) - 1
    for i in range(n):
        wd = w0_px + (w1_px - w0_px) * (i + 0.5) / n
        cv2.line(img, (int(q[i, 0]), int(q[i, 1])), (int(q[i + 1, 0]), int(q[i + 1, 1])), int(value),
                 max(1, int(round(wd))), cv2.LINE_8, shift)


def wavy_path(x0: float, y0: float, ang: float, length: float, wobble: float, rng_vals: np.ndarray) -> np.ndarray:
    """Points of a path from (x0, y0) along ``ang`` with a lateral wobble (``rng_vals``: one value per point)."""
    n = len(rng_vals)
    t = np.linspace(0.0, 1.0, n)
    lat = np.cumsum(rng_vals) * wobble * length / max(1, n)
    ca, sa = math.cos(ang), math.sin(ang)
    return np.stack([x0 + ca * t * length - sa * lat, y0 + sa * t * length + ca * lat], 1)


def nonzero_yx(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a 2D uint8 (or bool) mask, row-major like it, by cv2.findNonZero (several times faster)."""
    pts = cv2.findNonZero(mask.view(np.uint8) if mask.dtype == np.bool_ else mask)
    if pts is None:
        e = np.zeros(0, np.intp)
        return e, e
    pts = pts.reshape(-1, 2)
    return pts[:, 1].astype(np.intp), pts[:, 0].astype(np.intp)
