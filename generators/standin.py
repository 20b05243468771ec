"""A "real" stand-in for chest CT: the phantom drawn and imaged with a DIFFERENT configuration than the
``procedural`` backend (other anatomy ranges, pixel spacing, tissue calibration, parenchymal texture,
reconstruction kernel, noise spectrum and a cupping bias field), used where no real labelled chest CT exists.

It is not real data. Evaluations and training studies use it as held-out "real" data that the evaluated
(or trained-on) synthetic versions never saw: a model that does well on it has at least crossed a change of
scanner, kernel and population, which is the gap a real dataset would open. Every sample is rebuilt from
(seed, index) alone; every drawn parameter is returned.

    from generators.standin import standin_samples
    real = standin_samples(200, size=256, seed=7)      # list of dicts: image (HU), label, instance, ...
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from generators.chest_ct import draw_anatomy, draw_slice, place_nodules
from generators.ct_render import draw_render_params, render_ct
from schemas.errors import PlacementError

# Keeps stand-in seeds apart from every spec's seed stream (entropy tag, not a secret).
_STANDIN_ENTROPY = 0x5_7A_4D_1A


@dataclass(frozen=True)
class StandinConfig:
    """Ranges of the stand-in. Each differs from the procedural backend's on purpose (its value in comments)."""

    spacing_mm: tuple[float, float] = (1.3, 1.6)             # tests/benches use 1.2-1.4 for the synthetic side
    level: tuple[float, float] = (0.25, 0.9)                  # procedural spec default 0.15-0.95
    negatives: float = 0.2
    # findings: kind shares, diameters, margins (a screening-like mix; "any" lobe)
    kinds: dict[str, float] = field(default_factory=lambda: {"solid": 0.6, "part_solid": 0.2, "ground_glass": 0.2})
    diameter_mm: tuple[float, float] = (4.0, 20.0)
    margins: dict[str, float] = field(default_factory=lambda: {"smooth": 0.5, "lobulated": 0.3, "spiculated": 0.2})
    max_findings: int = 2
    # anatomy (procedural: body 290-370 mm wide, inspiration 0.85-1.05, asymmetry +-0.05)
    body_scale: tuple[float, float] = (0.9, 1.12)
    inspiration: tuple[float, float] = (0.75, 0.95)
    asymmetry: float = 0.09
    heart_scale: tuple[float, float] = (1.0, 1.2)
    # imaging (procedural: lung -880..-840 HU, texture 12-24 HU at 1.2-2.5 mm, PSF 0.35-0.6 mm, noise 10-22 HU
    # with grain 0.6-1.0 px, no sharpening, no cupping)
    lung_hu: tuple[float, float] = (-860.0, -800.0)
    fat_shift_hu: tuple[float, float] = (-15.0, 5.0)
    soft_shift_hu: tuple[float, float] = (-8.0, 12.0)
    texture_hu: tuple[float, float] = (22.0, 36.0)
    texture_sigma_mm: tuple[float, float] = (2.6, 4.0)
    psf_sigma_mm: tuple[float, float] = (0.6, 0.9)
    noise_hu: tuple[float, float] = (16.0, 30.0)
    noise_grain_px: tuple[float, float] = (0.35, 0.55)
    sharpen: tuple[float, float] = (0.3, 0.8)                 # unsharp-mask gain of a "lung" reconstruction kernel
    cupping_hu: tuple[float, float] = (10.0, 35.0)            # centre darker than the rim (beam hardening)


STANDIN = StandinConfig()
FAT_IDS = ("subcutaneous_fat", "mediastinal_fat")
SOFT_IDS = ("muscle", "heart", "great_vessel", "liver", "esophagus", "upper_abdomen", "pulmonary_vessel")


def standin_rng(seed: int, index: int, attempt: int = 0) -> np.random.Generator:
    ss = np.random.SeedSequence(entropy=(_STANDIN_ENTROPY, int(seed)), spawn_key=(int(index), int(attempt)))
    return np.random.Generator(np.random.PCG64(ss))


def _pick(rng: np.random.Generator, shares: dict[str, float]) -> str:
    names = list(shares)
    p = np.array([shares[n] for n in names], float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def draw_standin_request(rng: np.random.Generator, cfg: StandinConfig) -> dict[str, Any]:
    u = lambda r: float(rng.uniform(*r))  # noqa: E731
    findings = []
    if rng.random() >= cfg.negatives:
        for _ in range(int(rng.integers(1, cfg.max_findings + 1))):
            findings.append({"kind": _pick(rng, cfg.kinds), "diameter_mm": round(u(cfg.diameter_mm), 3),
                             "location": "any", "margin": _pick(rng, cfg.margins), "juxtapleural": False})
    return {"spacing_mm": round(u(cfg.spacing_mm), 4), "level": u(cfg.level), "findings": findings}


def restyle_anatomy(a: dict[str, Any], rng: np.random.Generator, cfg: StandinConfig) -> dict[str, Any]:
    """The procedural anatomy record moved into the stand-in's ranges (another population)."""
    u = lambda r: float(rng.uniform(*r))  # noqa: E731
    a = dict(a)
    s = u(cfg.body_scale)
    a["body_w"] *= s
    a["body_d"] *= s * u((0.95, 1.05))
    a["inspiration"] = u(cfg.inspiration)
    a["asym"] = float(rng.uniform(-cfg.asymmetry, cfg.asymmetry))
    hs = u(cfg.heart_scale)
    a["heart_rx"] *= hs
    a["heart_ry"] *= hs
    a["n_ribs"] = int(rng.integers(8, 12))
    a["minor_level"] = u((0.44, 0.6))
    return a


def draw_standin_render(rng: np.random.Generator, spacing_mm: float, cfg: StandinConfig) -> dict[str, Any]:
    u = lambda r: float(rng.uniform(*r))  # noqa: E731
    p = draw_render_params(rng, spacing_mm)
    lung = u(cfg.lung_hu)
    for n in ("lung_rul", "lung_rml", "lung_rll", "lung_lul", "lung_lll"):
        p["hu"][n] = lung + u((-8, 8))
    fs, ss = u(cfg.fat_shift_hu), u(cfg.soft_shift_hu)
    for n in FAT_IDS:
        p["hu"][n] += fs
    for n in SOFT_IDS:
        p["hu"][n] += ss
    p.update({"lung_texture_hu": u(cfg.texture_hu), "lung_texture_sigma_mm": u(cfg.texture_sigma_mm),
              "psf_sigma_mm": u(cfg.psf_sigma_mm), "noise_hu": u(cfg.noise_hu),
              "noise_sigma_px": u(cfg.noise_grain_px), "sharpen": u(cfg.sharpen), "cupping_hu": u(cfg.cupping_hu)})
    return p


def render_standin(label: np.ndarray, lobes: np.ndarray, spacing_mm: float, p: dict[str, Any]) -> np.ndarray:
    """The procedural imaging chain with the stand-in's parameters, then a sharpening kernel and cupping."""
    img = render_ct(label, lobes, spacing_mm, p)
    body = label > 1  # everything but outside air and the table
    blur = cv2.GaussianBlur(img, (0, 0), max(0.8, 1.2 / spacing_mm))
    img = img + np.float32(p["sharpen"]) * (img - blur)
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / (0.5 * min(h, w)) ** 2
    img -= body * np.float32(p["cupping_hu"]) * np.clip(1 - r2, 0, 1)
    np.clip(img, -1024, 3071, out=img)
    return img.astype(np.float32)


def standin_sample(index: int, *, size: int = 256, seed: int = 0, cfg: StandinConfig = STANDIN,
                   max_attempts: int = 6) -> dict[str, Any]:
    """Stand-in sample ``index``: {"image" float32 HU, "label" uint8, "instance" uint16, "spacing_mm",
    "findings" (placed: kind, diameter_mm, lobe, centre), "params", "index", "sample_id"}."""
    last = ""
    for attempt in range(max_attempts):
        rng = standin_rng(seed, index, attempt)
        req = draw_standin_request(rng, cfg)
        sp = req["spacing_mm"]
        anatomy = restyle_anatomy(draw_anatomy(rng, req["level"]), rng, cfg)
        label, lobes, geo = draw_slice(anatomy, size, size, sp)
        instance = np.zeros((size, size), np.uint16)
        try:
            placed = place_nodules(label, lobes, instance, req["findings"], sp, rng)
        except PlacementError as e:
            last = str(e)
            continue
        rp = draw_standin_render(rng, sp, cfg)
        image = render_standin(label, lobes, sp, rp)
        return {"image": image, "label": label, "instance": instance, "spacing_mm": sp, "findings": placed,
                "index": index, "sample_id": f"standin-{seed}-{index:06d}", "attempt": attempt,
                "params": {"request": req, "anatomy": anatomy, "geometry": geo, "render": rp}}
    raise PlacementError(f"stand-in sample {index}: no valid layout in {max_attempts} attempts ({last})")


def standin_samples(n: int, *, size: int = 256, seed: int = 0, start: int = 0, cfg: StandinConfig = STANDIN
                    ) -> list[dict[str, Any]]:
    """``n`` stand-in samples with indices ``start .. start+n-1`` (disjoint index ranges give disjoint sets)."""
    return [standin_sample(i, size=size, seed=seed, cfg=cfg) for i in range(start, start + n)]


standin_samples.note = ("stand-in: the phantom with a different anatomy, calibration, kernel and noise "
                        "configuration — NOT real data")

__all__ = ["StandinConfig", "STANDIN", "standin_sample", "standin_samples", "render_standin", "standin_for"]


# Stand-in builders per domain (shared code looks them up; a domain without one has no built-in reference).
STANDIN_BUILDERS = {"chest_ct": standin_samples}


def standin_for(domain: str):
    """The stand-in builder of ``domain``: fn(n, size=, seed=, start=) -> list of sample dicts."""
    if domain not in STANDIN_BUILDERS:
        from schemas.errors import SpecError

        raise SpecError(f"no built-in stand-in reference for domain {domain!r}; stand-ins exist for: "
                        f"{', '.join(sorted(STANDIN_BUILDERS))}; give --real a folder or a dataset version")
    return STANDIN_BUILDERS[domain]
