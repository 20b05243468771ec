"""Nodule insertion into a CT *volume*: a 3-D shape sized by its volume-equivalent diameter, placed with its 2 mm
shell inside the requested region and off vessels (distances in mm on the anisotropic grid), partial volume from
in-plane supersampling and the slice profile (a box of the slice spacing), and per slice the same NPS-matched
intensity model as the 2-D insertion (generators/ct_insert.py).

Limits: the noise synthesised inside the lesion is independent from slice to slice (no through-plane noise
correlation is estimated); spiculated margins become an irregular surface (no 3-D spicules).
"""
from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

from generators.ct_insert import _fit, _plane_var, draw_lesion_hu, local_mean, local_noise_var
from generators.ct_sources import NoiseModel, synthesize_noise
from schemas.errors import PlacementError

SS_XY, SS_Z = 4, 8


def _inside(R: float, p: dict, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Points (mm from the centre) inside the shape: radius R (mm) modulated by the in-plane harmonics."""
    amps, phases = np.asarray(p["harmonics"]), np.asarray(p["phases"])
    th = np.arctan2(y, x)
    k = np.arange(2, 2 + amps.size)
    mod = 1 + sum(a * np.cos(kk * th + ph) for a, kk, ph in zip(amps, k, phases))
    return np.sqrt(x * x + y * y + z * z) <= R * mod


def draw_shape(diameter_mm: float, margin: str, rng: np.random.Generator) -> dict[str, Any]:
    k = np.arange(2, 7)
    if margin == "smooth":
        amps = np.where(k == 2, rng.uniform(0.02, 0.08), rng.uniform(0.0, 0.02, size=k.size))
    elif margin == "lobulated":
        amps = rng.uniform(0.0, 0.03, size=k.size)
        amps[rng.integers(1, 4)] = rng.uniform(0.1, 0.17)
    else:
        amps = rng.uniform(0.04, 0.09, size=k.size)
    return {"margin": margin, "harmonics": [float(a) for a in amps],
            "phases": [float(v) for v in rng.uniform(0, 2 * np.pi, size=k.size)],
            "subvoxel": [float(v) for v in rng.uniform(-0.5, 0.5, size=3)], "diameter_mm": diameter_mm}


def rasterise(p: dict, R: float, sp: float, dz: float, fractions: bool = True
              ) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int, int]]:
    """(label patch (nz, n, n) bool: voxel centres inside, alpha patch: voxel fraction inside, centre index)."""
    reach = R * (1 + sum(p["harmonics"])) + 2 * sp
    n = int(math.ceil(reach / sp)) * 2 + 1
    nz = int(math.ceil(reach / dz)) * 2 + 1
    c, cz = n // 2, nz // 2
    sx, sy, sz = p["subvoxel"]
    zz, yy, xx = np.meshgrid((np.arange(nz) - cz - sz) * dz, (np.arange(n) - c - sy) * sp,
                             (np.arange(n) - c - sx) * sp, indexing="ij")
    label = _inside(R, p, xx, yy, zz)
    if not fractions:
        return label, None, (cz, c, c)
    # Fractions: SS_Z x SS_XY x SS_XY sub-samples per voxel.
    oz = (np.arange(SS_Z) + 0.5) / SS_Z - 0.5
    oxy = (np.arange(SS_XY) + 0.5) / SS_XY - 0.5
    alpha = np.zeros(label.shape, np.float32)
    for a in oz:
        for b in oxy:
            for d in oxy:
                alpha += _inside(R, p, xx + d * sp, yy + b * sp, zz + a * dz)
    alpha /= SS_Z * SS_XY * SS_XY
    return label, alpha, (cz, c, c)


def nodule_volume(diameter_mm: float, margin: str, sp: float, dz: float, rng: np.random.Generator):
    """Shape parameters and rasters with the label's volume-equivalent diameter calibrated to the request."""
    p = draw_shape(diameter_mm, margin, rng)
    target = math.pi / 6 * diameter_mm ** 3
    R = diameter_mm / 2
    for _ in range(8):
        label, _, _ = rasterise(p, R, sp, dz, fractions=False)
        vol = float(label.sum()) * sp * sp * dz
        if vol == 0:
            R *= 1.2
            continue
        ratio = target / vol
        if abs(ratio - 1) < 0.003:
            break
        R *= ratio ** (1 / 3)
    label, alpha, centre = rasterise(p, R, sp, dz)
    p["radius_mm"] = float(R)
    return p, label, alpha, centre


def equivalent_diameter_mm(mask: np.ndarray, sp: float, dz: float) -> float:
    return float((6 / math.pi * mask.sum() * sp * sp * dz) ** (1 / 3))


def insert_nodule_3d(hu: np.ndarray, region: np.ndarray, vessels: np.ndarray, finding: dict, sp: float, dz: float,
                     noise: NoiseModel, psf_sigma_px: float, rng: np.random.Generator,
                     label: np.ndarray, instance: np.ndarray, instance_id: int = 1) -> tuple[np.ndarray, dict]:
    """Place and insert one nodule into the volume ``hu`` (Z, H, W); ``region`` is the requested region (bool),
    ``vessels`` the vessel mask (bool). Writes label/instance; returns (new volume, placed record)."""
    p, lab_patch, alpha, (cz, cy, cx) = nodule_volume(finding["diameter_mm"], finding["margin"], sp, dz, rng)
    reach = p["radius_mm"] * (1 + sum(p["harmonics"])) + 0.5 * sp
    samp = (dz, sp, sp)
    d_want = ndimage.distance_transform_edt(np.pad(region, 1), sampling=samp)[1:-1, 1:-1, 1:-1]
    d_vessel = ndimage.distance_transform_edt(np.pad(~vessels, 1, constant_values=True), sampling=samp)[1:-1, 1:-1, 1:-1]
    ok = (d_want >= reach + 2.0) & (d_vessel >= reach + sp)
    zs, ys, xs = np.nonzero(ok)
    if zs.size == 0:
        raise PlacementError(f"no room for a {finding['diameter_mm']:.1f} mm nodule in this volume")
    j = int(rng.integers(zs.size))
    z0, y0, x0 = zs[j] - cz, ys[j] - cy, xs[j] - cx
    nz, n, _ = lab_patch.shape
    Z, H, W = hu.shape
    if z0 < 0 or y0 < 0 or x0 < 0 or z0 + nz > Z or y0 + n > H or x0 + n > W:
        raise PlacementError("nodule leaves the volume")
    sl = (slice(z0, z0 + nz), slice(y0, y0 + n), slice(x0, x0 + n))
    label[sl][lab_patch] = 20 if finding["kind"] == "solid" else 21
    instance[sl][lab_patch] = instance_id
    out = hu.copy()
    values = draw_lesion_hu(finding["kind"], rng)
    pad = int(math.ceil(3 * max(1.0, 2.0 / sp, psf_sigma_px))) + 2
    for k in range(nz):
        a2 = cv2.GaussianBlur(alpha[k], (0, 0), psf_sigma_px) if psf_sigma_px > 0 else alpha[k]
        if not a2.any():
            continue
        z = z0 + k
        wy0, wx0 = max(0, y0 - pad), max(0, x0 - pad)
        wy1, wx1 = min(H, y0 + n + pad), min(W, x0 + n + pad)
        win = (slice(wy0, wy1), slice(wx0, wx1))
        bg = out[z][win].copy()
        al = np.zeros(bg.shape, np.float32)
        al[y0 - wy0:y0 - wy0 + n, x0 - wx0:x0 - wx0 + n] = a2
        clean = (region[z] & ~vessels[z])[win]
        low = local_mean(bg, clean, sp)
        res = bg - low
        if finding["kind"] == "ground_glass":
            base = float(np.median(low[al > 0.5])) if (al > 0.5).any() else float(np.median(low))
            out[z][win] = bg + al * (values["ground_glass_hu"] - base)
            continue
        L = values["solid_hu"]
        mean = low * (1 - al) + al * L
        synth = synthesize_noise((64, 64), noise, rng)
        core = np.pad((al >= 0.5).astype(np.uint8), 1)
        inner = cv2.distanceTransform(core, cv2.DIST_L2, 5)[1:-1, 1:-1] >= max(2.5, 0.5 + 3 * psf_sigma_px)
        target = local_noise_var(out[z], region[z] & ~vessels[z], inner, (wy0, wx0), sp, reach / sp) \
            if inner.sum() >= 6 else None
        synth = _fit(synth, bg.shape)
        if target is not None:
            iy, ix = np.nonzero(inner)
            got = _plane_var(synth[iy, ix], iy, ix)
            if got > 0:
                synth *= math.sqrt(target / got)
        th = np.clip(al, 0, 1) * (np.pi / 2)
        out[z][win] = mean + np.cos(th) * res + np.sin(th) * synth
    np.clip(out, -1024, 3071, out=out)
    placed = {**finding, "instance": instance_id, "center_vox": [int(zs[j]), int(ys[j]), int(xs[j])],
              "shape": p, "values": values}
    return out, placed
