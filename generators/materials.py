"""Procedural material backgrounds (albedo in 0..1) and the camera model (lighting, vignetting, noise, blur).

TorchIO-style: ``draw_material_params(material, rng, ...)`` draws a small record (with a ``seed`` for the noise
fields); ``material_albedo(material, params, hw)`` is a pure function of that record. Pixels live here only.
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np

PROCEDURAL_MATERIALS = ("brushed_metal", "cast_metal", "painted", "plastic", "wood", "textile")

_PAINTS = [(0.72, 0.10, 0.08), (0.10, 0.25, 0.60), (0.15, 0.45, 0.20), (0.80, 0.80, 0.78), (0.20, 0.20, 0.22),
           (0.90, 0.65, 0.10)]
_PLASTICS = [(0.12, 0.12, 0.13), (0.85, 0.85, 0.82), (0.20, 0.35, 0.65), (0.75, 0.20, 0.15), (0.55, 0.55, 0.55)]
_TEXTILES = [(0.20, 0.25, 0.45), (0.55, 0.50, 0.42), (0.35, 0.12, 0.12), (0.30, 0.40, 0.30), (0.70, 0.68, 0.62)]


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**63 - 1))


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return round(float(rng.uniform(lo, hi)), 5)


def value_noise(g: np.random.Generator, hw: tuple[int, int], cell_px: float) -> np.ndarray:
    """Smooth noise in about [-1, 1] with features of about ``cell_px`` pixels (bicubic upsampling of a grid)."""
    h, w = hw
    cell_px = max(float(cell_px), 1.0)
    gh, gw = max(2, int(round(h / cell_px)) + 1), max(2, int(round(w / cell_px)) + 1)
    grid = g.random((gh, gw), dtype=np.float32) * 2 - 1
    if cell_px >= 8:  # bicubic to a quarter of the size, then bilinear: smooth enough and 5x cheaper
        q = cv2.resize(grid, ((w + 3) // 4, (h + 3) // 4), interpolation=cv2.INTER_CUBIC)
        return cv2.resize(q, (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def streaks(g: np.random.Generator, hw: tuple[int, int], length_px: float, angle_deg: float,
            line_amp: float = 0.0) -> np.ndarray:
    """About unit-variance noise stretched to ``length_px`` along ``angle_deg`` (brushing, fibres): a random grid
    coarse along the streaks, mapped to the image by one affine warp (upsampling and rotation at once)."""
    h, w = hw
    step = max(1.0, length_px / 4)
    diag = int(np.ceil(np.hypot(h, w))) + 4
    gw, gh = int(np.ceil(diag / step)) + 2, diag
    grid = g.random((gh, gw), dtype=np.float32) - 0.5
    grid = cv2.blur(grid, (3, 1)) * np.float32(np.sqrt(12 * 3))
    if line_amp:  # streaks running the whole length (one value per line), relative amplitude line_amp
        grid += np.float32(line_amp) * cv2.GaussianBlur(g.standard_normal((gh, 1)).astype(np.float32), (1, 0), 0.7)
    a = np.deg2rad(angle_deg)
    c, s_ = np.cos(a), -np.sin(a)  # screen counter-clockwise
    # output (x, y) -> grid (u, v): u along the streak (coarse), v across (pixel rate)
    m = np.array([[c / step, s_ / step, 0.0], [-s_, c, 0.0]])
    m[:, 2] = np.array([gw / 2, gh / 2]) - m[:, :2] @ np.array([w / 2, h / 2])
    return cv2.warpAffine(grid, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT)


def weave(hw: tuple[int, int], thread_px: float, angle_deg: float) -> np.ndarray:
    """Plain weave (warp over weft on alternate cells), 0..1: one two-thread tile, rotated and repeated over the
    image by an affine warp with wrap-around borders. The thread width is rounded to half a pixel."""
    h, w = hw
    t2 = max(8, int(round(2 * max(4.0, thread_px))))  # tile side: two threads
    per = t2 / 2.0
    c = (np.arange(t2, dtype=np.float32) + 0.5) / np.float32(per)
    f = c - np.floor(c)
    sx = np.sin(np.float32(np.pi) * f)[None, :]
    sy = np.sin(np.float32(np.pi) * f)[:, None]
    cell = np.floor(c).astype(np.int32)
    warp_top = ((cell[None, :] + cell[:, None]) & 1) == 0
    tile = np.where(warp_top, sx * (0.75 + 0.25 * sy), sy * (0.75 + 0.25 * sx)).astype(np.float32)
    a = np.deg2rad(angle_deg)
    # repeat the tile over the rotated image's footprint (OpenCV's wrap-around border is ~4x slower than this)
    off = int(np.ceil(max(h, w) * abs(np.sin(a)))) + t2
    reps_y, reps_x = (h + 2 * off) // t2 + 2, (w + 2 * off) // t2 + 2
    big = np.tile(tile, (reps_y, reps_x))
    m = np.array([[np.cos(a), np.sin(a), off], [-np.sin(a), np.cos(a), off]])
    return cv2.warpAffine(big, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT)


def fbm(g: np.random.Generator, hw: tuple[int, int], cell_px: float, octaves: int = 3) -> np.ndarray:
    out = np.zeros(hw, np.float32)
    amp, total = 1.0, 0.0
    for i in range(octaves):
        out += amp * value_noise(g, hw, cell_px / 2**i)
        total += amp
        amp *= 0.5
    return out / total


def draw_material_params(material: str, rng: np.random.Generator) -> dict[str, Any]:
    """Draw every parameter of a material background (sizes in mm where physical)."""
    p: dict[str, Any] = {"material": material, "seed": _seed(rng)}
    if material == "brushed_metal":
        p.update(level=_u(rng, 0.55, 0.72), grain_mm=_u(rng, 3.0, 12.0), grain_amp=_u(rng, 0.03, 0.07),
                 streak_amp=_u(rng, 0.02, 0.05), mottle_amp=_u(rng, 0.01, 0.04),
                 angle_deg=round(float(rng.choice([0.0, 90.0]) + rng.uniform(-8, 8)), 3),
                 tint=[_u(rng, 0.95, 1.0), _u(rng, 0.97, 1.0), 1.0])
    elif material == "cast_metal":
        p.update(level=_u(rng, 0.35, 0.5), mottle_mm=_u(rng, 2.0, 8.0), mottle_amp=_u(rng, 0.04, 0.09),
                 grain_amp=_u(rng, 0.04, 0.08), pore_density=_u(rng, 0.001, 0.004), pore_depth=_u(rng, 0.1, 0.25),
                 tint=[_u(rng, 0.92, 1.0), _u(rng, 0.92, 0.98), _u(rng, 0.88, 0.96)])
    elif material == "painted":
        p.update(color=list(_PAINTS[int(rng.integers(len(_PAINTS)))]), peel_mm=_u(rng, 0.3, 0.8),
                 peel_amp=_u(rng, 0.02, 0.05), gloss=_u(rng, 0.0, 0.12))
    elif material == "plastic":
        p.update(color=list(_PLASTICS[int(rng.integers(len(_PLASTICS)))]), flow_period_mm=_u(rng, 1.0, 4.0),
                 flow_amp=_u(rng, 0.015, 0.04), flow_angle_deg=_u(rng, 0, 180), warp_mm=_u(rng, 2.0, 8.0),
                 grain_amp=_u(rng, 0.01, 0.025))
    elif material == "wood":
        p.update(light=[_u(rng, 0.72, 0.85), _u(rng, 0.52, 0.62), _u(rng, 0.32, 0.42)],
                 dark=[_u(rng, 0.42, 0.55), _u(rng, 0.26, 0.35), _u(rng, 0.12, 0.2)],
                 ring_mm=_u(rng, 2.0, 6.0), warp_mm=_u(rng, 10.0, 30.0), warp_amp=_u(rng, 0.5, 1.5),
                 fibre_amp=_u(rng, 0.04, 0.1), vertical=bool(rng.random() < 0.5))
    elif material == "textile":
        p.update(color=list(_TEXTILES[int(rng.integers(len(_TEXTILES)))]), thread_mm=_u(rng, 0.4, 1.2),
                 fibre_amp=_u(rng, 0.05, 0.12), relief=_u(rng, 0.25, 0.45), angle_deg=_u(rng, -5, 5))
    else:
        raise ValueError(f"unknown procedural material {material!r}")
    return p


def material_albedo(material: str, p: dict[str, Any], hw: tuple[int, int], spacing_mm: float) -> np.ndarray:
    """Pure function: parameter record -> grey albedo float32 HxW (the luminance of the material's colours), about
    0..1. Colour images are made after the camera model by ``material_palette``: every material's colour is a
    per-channel function of its luminance, so RGB costs a lookup instead of three float channels."""
    g = np.random.default_rng(p["seed"])  # a local generator from the recorded seed, never global state
    h, w = hw
    mm = 1.0 / spacing_mm  # pixels per mm
    if material == "brushed_metal":
        alb = p["grain_amp"] * streaks(g, hw, p["grain_mm"] * mm, p["angle_deg"], p["streak_amp"] / p["grain_amp"])
        alb += p["level"]
        alb += p["mottle_amp"] * value_noise(g, hw, 20 * mm)
        tint = p["tint"]
    elif material == "cast_metal":
        alb = p["level"] + p["mottle_amp"] * fbm(g, hw, p["mottle_mm"] * mm, 3)
        fine = g.random(hw, dtype=np.float32) - 0.5
        fine *= np.float32(p["grain_amp"] * 3.0)
        n_pores = int(g.poisson(p["pore_density"] * h * w))
        fine.ravel()[g.integers(0, h * w, n_pores)] -= np.float32(p["pore_depth"] * 4.0)
        alb += cv2.GaussianBlur(fine, (0, 0), max(0.6, 0.05 * mm))
        tint = p["tint"]
    elif material == "painted":
        peel = value_noise(g, hw, max(3.0, p["peel_mm"] * mm))
        ys = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
        alb = (1.0 + p["gloss"] * np.exp(-4 * ys * ys)) + p["peel_amp"] * peel
        tint = p["color"]
    elif material == "plastic":
        t = np.deg2rad(p["flow_angle_deg"])
        xs = np.arange(w, dtype=np.float32)[None, :] * np.float32(np.cos(t))
        ys = np.arange(h, dtype=np.float32)[:, None] * np.float32(np.sin(t))
        u = xs + ys + (p["warp_mm"] * mm) * value_noise(g, hw, 25 * mm)
        alb = 1.0 + p["flow_amp"] * np.sin(u * np.float32(2 * np.pi / (p["flow_period_mm"] * mm)))
        alb += p["grain_amp"] * value_noise(g, hw, 2.0)
        tint = p["color"]
    elif material == "wood":
        hh, ww = (w, h) if p["vertical"] else (h, w)
        v = np.arange(hh, dtype=np.float32)[:, None] + (p["warp_amp"] * p["ring_mm"] * mm) * (
            3 * value_noise(g, (hh, ww), p["warp_mm"] * mm))
        rings = 0.5 + 0.5 * np.sin(v * np.float32(2 * np.pi / (p["ring_mm"] * mm)))
        rings = 0.15 + 0.7 * rings * rings
        alb = np.clip(rings + p["fibre_amp"] * streaks(g, (hh, ww), 4 * mm, 0.0), 0, 1).astype(np.float32)
        if p["vertical"]:
            alb = np.ascontiguousarray(alb.T)
        lg, dg = _lum(p["light"]), _lum(p["dark"])
        return dg + alb * np.float32(lg - dg)
    elif material == "textile":
        alb = weave(hw, p["thread_mm"] * mm, p["angle_deg"])
        alb = (1.0 - p["relief"]) + p["relief"] * alb
        alb += p["fibre_amp"] * value_noise(g, hw, 1.5)
        tint = p["color"]
    else:
        raise ValueError(f"unknown procedural material {material!r}")
    alb = alb.astype(np.float32, copy=False)
    return alb * np.float32(_lum(tint))


def _lum(c) -> float:
    return float(0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2])


def material_palette(material: str, p: dict[str, Any]) -> np.ndarray:
    """Pure function: 256x3 uint8 lookup table, lit grey level -> RGB, for the material's colours. Tinted
    materials scale the grey level by tint / luminance(tint); wood blends its dark and light colours by level."""
    v = np.arange(256, dtype=np.float64)
    if material == "wood":
        light, dark = np.array(p["light"]), np.array(p["dark"])
        lg, dg = _lum(light), _lum(dark)
        a = np.clip((v / 255.0 - dg) / max(lg - dg, 1e-6), 0, 1)[:, None]
        col = dark[None] + a * (light - dark)[None]
        chroma = col / (dg + a * (lg - dg))
    else:
        t = np.array(p["tint"] if "tint" in p else p["color"], dtype=np.float64)
        chroma = np.repeat((t / _lum(t))[None], 256, 0)
    return np.clip(np.rint(v[:, None] * chroma), 0, 255).astype(np.uint8)


def colourise(grey8: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """uint8 HxW -> HxWx3 RGB through a 256x3 table."""
    return cv2.LUT(cv2.merge([grey8, grey8, grey8]), lut.reshape(256, 1, 3))


def draw_camera_params(rng: np.random.Generator, photo: bool) -> dict[str, Any]:
    if photo:  # a real photo already has its lighting and noise; add only a little sensor noise
        return {"gain": 1.0, "grad_x": 0.0, "grad_y": 0.0, "vignette": 0.0, "noise_std": _u(rng, 0.5, 1.5),
                "blur_sigma": 0.0, "seed": _seed(rng)}
    return {"gain": _u(rng, 0.85, 1.1), "grad_x": _u(rng, -0.2, 0.2), "grad_y": _u(rng, -0.2, 0.2),
            "vignette": _u(rng, 0.0, 0.35), "noise_std": _u(rng, 1.0, 4.0), "blur_sigma": _u(rng, 0.3, 0.8),
            "seed": _seed(rng)}


def apply_camera(img: np.ndarray, p: dict[str, Any], scale: float = 255.0) -> np.ndarray:
    """Pure function: albedo (0..1) -> uint8 through lighting gradient, vignetting, sensor noise (luminance noise,
    triangular with the given std in grey levels, shared by the colour channels) and Gaussian blur."""
    h, w = img.shape[:2]
    xs = np.linspace(-0.5, 0.5, w, dtype=np.float32)
    ys = np.linspace(-0.5, 0.5, h, dtype=np.float32)
    light = ((p["gain"] * scale) * (1 + p["grad_x"] * xs))[None, :] + (p["gain"] * scale * p["grad_y"]) * ys[:, None]
    if p["vignette"]:
        light *= 1 - p["vignette"] * (xs[None, :] ** 2 + ys[:, None] ** 2) * 2
    g = np.random.default_rng(p["seed"])
    # Sum of two uniforms (triangular): close to Gaussian sensor noise at a fraction of the cost.
    n = g.integers(0, 256, size=(h, w), dtype=np.uint8).astype(np.float32)
    n += g.integers(0, 256, size=(h, w), dtype=np.uint8)
    n -= 255.0
    n *= np.float32(p["noise_std"] / 104.2)
    if img.ndim == 3:
        out = img * light[..., None]
        out += n[..., None]
    else:
        out = img * light
        out += n
    out8 = np.clip(out, 0, 255).astype(np.uint8)
    if p["blur_sigma"] > 0:
        out8 = cv2.GaussianBlur(out8, (0, 0), p["blur_sigma"])
    return out8
