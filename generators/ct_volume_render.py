"""Procedural CT volume renderer: 3D label + partial-volume maps -> int16 Hounsfield units.

Physics, in order: tissue HU drawn per volume from published ranges; lung parenchymal texture (3D, a few mm
correlation) and the dependent gradient; vessels blended by their partial-volume weight; fissures as thin
sheets averaged over the slab; nodules with soft, irregular edges and internal texture; in-plane PSF
(Gaussian); slice-sensitivity profile along z (Gaussian, FWHM = slice thickness); quantum noise with a
CT-like band-pass NPS (difference of Gaussians: zero at DC, peak at mid frequencies). Every parameter is
drawn by ``draw_volume_render_params`` and recorded; ``render_volume`` uses no other randomness.
"""
from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from generators.ct_models import band_noise, soft_occupancy, trabecular
from generators.ct_render import HU_RANGES as SLICE_HU_RANGES
from schemas.volume import VOLUME_IDS, VolumeGeometry

V = VOLUME_IDS
HU_RANGES: dict[str, tuple[float, float]] = {
    **SLICE_HU_RANGES,
    "lung_rul": (-865, -815), "lung_rml": (-865, -815), "lung_rll": (-865, -815), "lung_lul": (-865, -815),
    "lung_lll": (-865, -815),
    "heart": (42, 58), "heart_chamber": (30, 42), "stomach": (10, 35), "gas": (-1000, -980),
    "cartilage": (90, 180), "cancellous_bone": (120, 220), "cortical_bone": (700, 1100),
}
LUNG_PARENCHYMA = [V[n] for n in ("lung_rul", "lung_rml", "lung_rll", "lung_lul", "lung_lll")]
IS_LUNG = np.zeros(256, bool)
IS_LUNG[LUNG_PARENCHYMA + [V["pulmonary_vessel"]]] = True
IS_SOFT = np.zeros(256, bool)
IS_SOFT[[V["muscle"], V["liver"], V["heart"], V["heart_chamber"], V["upper_abdomen"], V["stomach"]]] = True
IS_BONE = np.zeros(256, bool)
IS_BONE[V["cancellous_bone"]] = True


def draw_volume_render_params(rng: np.random.Generator, spacing: tuple[float, float, float]) -> dict[str, Any]:
    u = lambda a, b: float(rng.uniform(a, b))  # noqa: E731
    hu = {name: u(*r) for name, r in HU_RANGES.items()}
    lung = u(*HU_RANGES["lung_rul"])
    for n in ("lung_rul", "lung_rml", "lung_rll", "lung_lul", "lung_lll"):
        hu[n] = lung + u(-5, 5)
    return {
        "hu": hu,
        "lung_gradient_hu": u(25, 50),
        "lung_texture_hu": u(14, 22), "lung_texture_mm": u(2.0, 3.5),
        "soft_texture_hu": u(2, 5), "bone_texture_hu": u(80, 130), "bone_texture_mm": u(0.8, 1.4),
        "fissure_hu": u(700, 900),
        "psf_sigma_mm": u(0.35, 0.55),
        "ssp_fwhm_mm": float(spacing[0]) * u(1.0, 1.2),
        "noise_hu": u(14, 22),
        "nps_sigma_mm": u(0.45, 0.7),  # inner Gaussian of the band-pass; outer is 3x
        "nps_low_cut": u(0.8, 0.95),
        "noise_seed": int(rng.integers(0, 2**31 - 1)),
    }


def _coarse_field(rng: np.random.Generator, geom: VolumeGeometry, corr_mm: float) -> tuple[np.ndarray, float]:
    """Gaussian field with correlation length ~``corr_mm`` on a grid of that step (upsampled per slice)."""
    nz, ny, nx = geom.shape
    sz, sy, sx = geom.spacing
    step = max(sx, corr_mm)
    cz = max(2, int(math.ceil(nz * sz / step)) + 2)
    cy, cx = int(math.ceil(ny * sy / step)) + 2, int(math.ceil(nx * sx / step)) + 2
    f = rng.standard_normal((cz, cy, cx), dtype=np.float32)
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(f, 0.6, mode="wrap")
    f /= f.std() + 1e-6
    return f, step


def _field_slice(f: np.ndarray, step: float, geom: VolumeGeometry, k: int) -> np.ndarray:
    nz, ny, nx = geom.shape
    sz, sy, sx = geom.spacing
    zc = (k + 0.5) * sz / step
    i0 = int(zc)
    a = zc - i0
    i1 = min(i0 + 1, f.shape[0] - 1)
    s = (1 - a) * f[i0] + a * f[i1]
    # the coarse grid covers [0, n*spacing] in steps of ``step``: crop the part that maps onto the slice
    hy, hx = ny * sy / step, nx * sx / step
    M = np.float32([[hx / nx, 0, 0.5 * hx / nx - 0.5], [0, hy / ny, 0.5 * hy / ny - 0.5]])
    return cv2.warpAffine(s, M, (nx, ny), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT)


def render_volume(layout: dict[str, Any], geom: VolumeGeometry, p: dict[str, Any]) -> np.ndarray:
    """Render to int16 HU (clipped to [-1024, 3071]) in [k, j, i] order."""
    label, vessel_w, fissure = layout["label"], layout["vessel_w"], layout.get("fissure")
    nz, ny, nx = geom.shape
    sz, sy, sx = geom.spacing
    lut = np.full(256, -1000.0, np.float32)
    for name, v in p["hu"].items():
        lut[V[name]] = v
    lung_hu = float(np.mean([p["hu"][n] for n in ("lung_rul", "lung_rml", "lung_rll", "lung_lul", "lung_lll")]))
    lut[V["pulmonary_vessel"]] = lung_hu
    vessel_hu = p["hu"]["pulmonary_vessel"]
    nrng = np.random.default_rng(p["noise_seed"])
    tex, tstep = _coarse_field(nrng, geom, p["lung_texture_mm"])
    ys = geom.axis_mm(1).astype(np.float32)
    grad = (p["lung_gradient_hu"] * np.clip(ys / 100.0, -1, 1))[:, None].astype(np.float32)
    gain = np.zeros(256, np.float32)
    gain[IS_LUNG] = p["lung_texture_hu"]
    gain[IS_SOFT] = p["soft_texture_hu"]
    lungf = IS_LUNG.astype(np.float32)
    bstep = max(1, int(round(p["bone_texture_mm"] / sx)))
    bshape = (ny // bstep + 2, nx // bstep + 2)
    psf = max(0.3, p["psf_sigma_mm"] / sx)
    # nodules by slice
    nods = layout.get("nodules", [])
    out = np.empty(geom.shape, np.float32)
    for k in range(nz):
        lab = label[k]
        img = lut[lab]
        t = _field_slice(tex, tstep, geom, k)
        img += gain[lab] * t
        img += lungf[lab] * grad
        # trabecular bone: a fine random pattern per slice (bone texture changes within a few mm)
        bn = nrng.standard_normal(bshape, dtype=np.float32)
        bone = IS_BONE[lab]
        if bone.any():
            img += bone * trabecular(bn, bstep, ny, nx) * p["bone_texture_hu"]
        w = vessel_w[k]
        if w.any():
            wf = w.astype(np.float32) * np.float32(1 / 255)
            img += wf * (vessel_hu - img)
        if fissure is not None and fissure[k].any():
            img += fissure[k].astype(np.float32) * (lungf[lab] * np.float32(p["fissure_hu"] / 255))
        for nd in nods:
            _composite_nodule(img, k, nd, p, geom, t)
        out[k] = cv2.GaussianBlur(img, (0, 0), psf)
    # slice-sensitivity profile: Gaussian along z with FWHM = ssp_fwhm_mm, sampled at the slice spacing
    sig = p["ssp_fwhm_mm"] / 2.3548 / sz
    a = math.exp(-0.5 / sig ** 2) if sig > 0 else 0.0
    wz = np.array([a, 1.0, a]) / (1 + 2 * a)
    prev = out[0].copy()
    res = np.empty(geom.shape, np.int16)
    s1 = p["nps_sigma_mm"] / sx
    norm = None
    for k in range(nz):
        cur = out[k].copy()
        nxt = out[k + 1] if k + 1 < nz else cur
        v = wz[0] * prev + wz[1] * cur + wz[2] * nxt
        prev = cur
        n = nrng.standard_normal((ny, nx), dtype=np.float32)
        nb = band_noise(n, s1, p["nps_low_cut"])
        if norm is None:
            norm = p["noise_hu"] / (float(nb.std()) + 1e-6)
        v += nb * norm
        np.clip(v, -1024, 3071, out=v)
        res[k] = np.rint(v)
    return res


def _composite_nodule(img: np.ndarray, k: int, nd: dict, p: dict, geom: VolumeGeometry, tex: np.ndarray) -> None:
    ras = nd["_raster"]
    bz, by, bx = ras.box
    if not (bz.start <= k < bz.stop):
        return
    g = ras.gamma[k - bz.start]
    shp = nd["shape"]
    # soft, irregular boundary: distance to the label surface in mm, perturbed by the texture field
    win = img[by, bx]
    tw = tex[by, bx]
    occ = soft_occupancy((g - 1.0) * ras.radius_mm, shp["edge_mm"], tw)
    kind = nd["kind"]
    hu_solid = p["hu"]["nodule_solid"]
    hu_gg = p["hu"]["nodule_ground_glass"]
    target = (hu_solid if kind == "solid" else hu_gg) + tw * shp["texture_hu"]
    if kind == "part_solid" and ras.core is not None:
        c = ras.core[k - bz.start].astype(np.float32)
        if c.any():
            c = cv2.GaussianBlur(c, (0, 0), max(0.5, 0.6 / geom.spacing[2]))
            target = target + c * (hu_solid - hu_gg)
    win += occ.astype(np.float32) * (target - win)
