"""Nodule insertion into real CT slices: placement in the lung off vessels and pleura, partial-volume blending at
the scan's spacing, and noise matched to the surrounding parenchyma.

Image-domain insertion after Divel & Pelc (2020): the lesion replaces the *local mean* of the background, never
its noise. With ``alpha`` the lesion's partial-volume fraction per pixel (its shape supersampled 4x, then the
scanner blur), ``low`` the parenchyma's local mean and ``res = bg - low`` the background's own noise realisation,
a solid component is

    out = (1 - alpha) low + alpha L + cos(pi alpha / 2) res + sin(pi alpha / 2) n,

with ``n`` noise synthesised with the slice's measured NPS and std, so the noise power is the same at every alpha
(cos^2 + sin^2 = 1) and the lesion carries texture of the scanner's own spectrum. Ground glass (partly filled
air spaces) adds one contrast and keeps the background whole: ``out = bg + alpha (L_gg - median low)``, vessels
running through it included, as in real ground-glass nodules. Sizes use the phantom's calibration
(``generators.chest_ct.nodule_shape``). ``mode`` "disc" (a plain smooth disc) and "disc_white" (a disc with
white noise of the right std) are the baselines the bench compares against.
"""
from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from generators.base import register_layout, register_renderer
from generators.chest_ct import chest_ct_layout, nodule_shape, rasterise_nodule
from generators.ct_render import HU_RANGES, ProceduralCT
from generators.ct_sources import (NoiseModel, Scan, approximate_lobes, estimate_edge_blur, estimate_noise, load_scan,
                                   lung_sides,
                                   synthesize_noise, vessel_mask)
from schemas.chest_ct import CT_IDS, LOBES
from schemas.errors import PlacementError
from schemas.findings import SIDE_LOBES
from schemas.sample import Layout, SampleRequest

C = CT_IDS
SIDE_IDS = {"right": C["lung_right"], "left": C["lung_left"]}
RING_MM = 2.0  # the "surrounding ring" that must lie in the requested region (and is used for noise reference)
SUPERSAMPLE = 4
PSF_SIGMA_PX = 0.35  # scanner blur on top of the pixel's own partial volume
MODES = ("matched", "disc", "disc_white")


# ------------------------------------------------------------------------------------------------ slice context
def slice_regions(hu: np.ndarray, spacing: float, labels: np.ndarray | None, lobes_mode: str,
                  level: float | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(label map in pairforge ids, region map, info). The region map holds a lobe id, or the side ids where lobes
    are unknown, for every lung pixel. User labels are kept as they are; computed lungs fill unlabelled pixels."""
    info: dict[str, Any] = {}
    lobe_ids = list(LOBES.values())
    lung_ids = lobe_ids + list(SIDE_IDS.values())
    label = labels.copy() if labels is not None else np.zeros(hu.shape, np.uint8)
    if labels is not None and np.isin(labels, lung_ids).any():
        region = np.where(np.isin(labels, lung_ids), labels, 0).astype(np.uint8)
        info["lung_from"] = "user label map"
        if lobes_mode == "masks":
            info["lobes_from"] = "user label map"
    else:
        sides = lung_sides(hu, spacing)
        info["lung_from"] = "computed (threshold -400 HU, components, hole filling)"
        if lobes_mode == "approximate":
            region = approximate_lobes(sides, 0.5 if level is None else level)
            info["lobes_from"] = "approximate geometric rule"
            info["lobes_approximate"] = True
        else:
            region = np.where(sides == 1, SIDE_IDS["right"], np.where(sides == 2, SIDE_IDS["left"], 0)).astype(np.uint8)
        free = label == 0
        label[(region > 0) & free] = region[(region > 0) & free]
    # Body tissue the labels leave unnamed (so 0 stays "air outside").
    body = (cv2.GaussianBlur(hu, (0, 0), 1.0) > -500) & (label == 0)
    label[body] = C["tissue_unlabelled"]
    return label, region, info


def region_mask(region: np.ndarray, location: str) -> np.ndarray:
    if location == "any":
        return region > 0
    if location in SIDE_LOBES:
        ids = [LOBES[n] for n in SIDE_LOBES[location]] + [SIDE_IDS[location]]
        return np.isin(region, ids)
    return region == LOBES[location]


def region_name(region_id: int) -> str:
    for n, k in LOBES.items():
        if k == region_id:
            return n
    return {SIDE_IDS["right"]: "right", SIDE_IDS["left"]: "left"}.get(region_id, "none")


def side_of(region_id: int) -> str:
    name = region_name(region_id)
    return "right" if name in ("RUL", "RML", "RLL", "right") else "left" if name in ("LUL", "LLL", "left") else "none"


# ------------------------------------------------------------------------------------------------ placement
def _distance(mask: np.ndarray) -> np.ndarray:
    """Distance (px) to the nearest pixel outside ``mask``; the image border counts as outside (scans are often
    cropped through the lung)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]


def place_findings(region: np.ndarray, vessels: np.ndarray, findings: list[dict], sp: float,
                   rng: np.random.Generator, label: np.ndarray, instance: np.ndarray) -> list[dict]:
    """Place each finding with its ring (RING_MM) inside its requested region and off vessels; juxtapleural ones
    touch the lung's edge, juxtavascular ones touch a vessel. Writes label and instance; PlacementError if no room."""
    placed: list[dict] = []
    taken = np.zeros(region.shape, np.uint8)
    ring_px = RING_MM / sp
    d_lung = _distance(region > 0)
    d_vessel = _distance(~vessels)
    first_id = int(instance.max()) + 1
    for i, f in enumerate(findings):
        shape_p, patch, (ox, oy) = nodule_shape(f["diameter_mm"], f["margin"], sp, rng)
        ys, xs = np.nonzero(patch)
        reach = float(np.hypot(xs - ox, ys - oy).max()) + 0.75
        want = region_mask(region, f["location"]) & (taken == 0)
        d_want = _distance(want)
        if f.get("juxtapleural"):
            ok = want & (d_lung >= reach) & (d_lung <= reach + 1.5) & (d_vessel >= reach + 1)
        elif f.get("juxtavascular"):
            ok = (d_want >= reach + ring_px) & (d_vessel >= reach - 1) & (d_vessel <= reach + 0.5)
        else:
            ok = (d_want >= reach + ring_px) & (d_vessel >= reach + 1)
        cy_, cx_ = np.nonzero(ok)
        if cx_.size == 0:
            where = "the lungs" if f["location"] == "any" else f"the {f['location']} lung" if f["location"] in \
                SIDE_LOBES else f["location"]
            raise PlacementError(f"no room for a {f['diameter_mm']:.1f} mm nodule in {where} of this slice")
        j = int(rng.integers(cx_.size))
        cx, cy = int(cx_[j]), int(cy_[j])
        y0, x0 = cy - int(round(oy)), cx - int(round(ox))
        ph, pw = patch.shape
        if y0 < 0 or x0 < 0 or y0 + ph > region.shape[0] or x0 + pw > region.shape[1]:
            raise PlacementError("nodule patch leaves the image")
        sl = (slice(y0, y0 + ph), slice(x0, x0 + pw))
        kind = f["kind"]
        k = first_id + i
        core = None
        if kind == "part_solid":
            frac = float(rng.uniform(0.35, 0.6))
            shape_p["solid_fraction"] = frac
            core = _core_patch(patch, shape_p, (ox, oy))
        label[sl][patch] = C["nodule_solid"] if kind == "solid" else C["nodule_ground_glass"]
        if core is not None:
            label[sl][core] = C["nodule_solid"]
        instance[sl][patch] = k
        taken[max(0, y0 - int(ring_px) - 2):y0 + ph + int(ring_px) + 2,
              max(0, x0 - int(ring_px) - 2):x0 + pw + int(ring_px) + 2] = 1
        rid = int(np.bincount(region[sl][patch], minlength=256).argmax())
        placed.append({**f, "instance": k, "lobe": region_name(rid), "side": side_of(rid),
                       "requested_location": f["location"], "patch_origin_px": [x0, y0],
                       "center_px": [cx + ox - round(ox), cy + oy - round(oy)],
                       "center_mm": [round((cx + 0.5) * sp, 3), round((cy + 0.5) * sp, 3)],
                       "shape": shape_p})
    return placed


def _core_patch(patch: np.ndarray, shape_p: dict, off: tuple[float, float]) -> np.ndarray:
    """The solid core of a part-solid nodule, as the phantom draws it (same centre, no spicules)."""
    ox, oy = off
    ph, pw = patch.shape
    core, (cox, coy) = rasterise_nodule(shape_p["radius_px"] * shape_p["solid_fraction"], {**shape_p, "spicules": []})
    cy0, cx0 = int(round(oy - coy)), int(round(ox - cox))
    cp = np.zeros_like(patch)
    cp[cy0:cy0 + core.shape[0], cx0:cx0 + core.shape[1]] = core[: ph - cy0, : pw - cx0]
    return cp & patch


# ------------------------------------------------------------------------------------------------ intensities
def partial_volume(shape_p: dict, radius_px: float, patch_shape: tuple[int, int], off: tuple[float, float],
                   spicules: bool = True, psf_sigma_px: float = PSF_SIGMA_PX) -> np.ndarray:
    """Per-pixel area fraction of the nodule's continuous shape (4x supersampled), blurred by the scanner PSF."""
    ss = SUPERSAMPLE
    p = {**shape_p, "spicules": shape_p["spicules"] if spicules else [], "subpixel": [0.0, 0.0]}
    hi, (chx, chy) = rasterise_nodule(radius_px * ss, p)
    ph, pw = patch_shape
    canvas = np.zeros((ph * ss, pw * ss), np.float32)
    # Low-res point x maps to high-res ss*x + (ss-1)/2; the shape's centre sits at ``off`` in the low-res patch.
    tx, ty = ss * off[0] + (ss - 1) / 2 - chx, ss * off[1] + (ss - 1) / 2 - chy
    M = np.float32([[1, 0, tx], [0, 1, ty]])
    canvas = cv2.warpAffine(hi.astype(np.float32), M, (pw * ss, ph * ss), flags=cv2.INTER_LINEAR)
    alpha = canvas.reshape(ph, ss, pw, ss).mean((1, 3))
    return cv2.GaussianBlur(alpha, (0, 0), psf_sigma_px)


def _paste(dst: np.ndarray, src: np.ndarray, y: int, x: int) -> None:
    """dst[y:, x:] = src, clipped to dst (a widened patch may reach past the image edge)."""
    ys, xs = max(0, -y), max(0, -x)
    y1, x1 = min(dst.shape[0], y + src.shape[0]), min(dst.shape[1], x + src.shape[1])
    dst[max(0, y):y1, max(0, x):x1] = src[ys:ys + y1 - max(0, y), xs:xs + x1 - max(0, x)]


def local_mean(bg: np.ndarray, clean: np.ndarray, sp: float) -> np.ndarray:
    """Mean of the parenchyma around each pixel (2 mm Gaussian, vessels left out by normalised convolution)."""
    s = max(1.0, 2.0 / sp)
    w = clean.astype(np.float32)
    num = cv2.GaussianBlur(bg * w, (0, 0), s)
    den = cv2.GaussianBlur(w, (0, 0), s)
    plain = cv2.GaussianBlur(bg, (0, 0), s)
    return np.where(den > 0.05, num / np.maximum(den, 1e-6), plain).astype(np.float32)


def draw_lesion_hu(kind: str, rng: np.random.Generator) -> dict[str, float]:
    out = {}
    if kind in ("solid", "part_solid"):
        out["solid_hu"] = float(rng.uniform(*HU_RANGES["nodule_solid"]))
    if kind in ("ground_glass", "part_solid"):
        out["ground_glass_hu"] = float(rng.uniform(*HU_RANGES["nodule_ground_glass"]))
    return out


def insert_intensities(hu: np.ndarray, clean: np.ndarray, placed: list[dict], sp: float, noise: NoiseModel,
                       rng: np.random.Generator, mode: str = "matched",
                       psf_sigma_px: float = PSF_SIGMA_PX) -> tuple[np.ndarray, list[dict]]:
    """The slice with every placed nodule's HU blended in (see the module docstring). Returns (image, params)."""
    if mode not in MODES:
        raise ValueError(f"insertion mode {mode!r}; accepted: {', '.join(MODES)}")
    out = hu.astype(np.float32).copy()
    params = []
    pad = int(math.ceil(3 * max(1.0, 2.0 / sp, psf_sigma_px))) + 2
    for f in placed:
        sp_ = f["shape"]
        x0, y0 = f["patch_origin_px"]
        R = sp_["radius_px"]
        # The patch the shape was rasterised in (same size rule as rasterise_nodule).
        amps = np.asarray(sp_["harmonics"])
        reach = R * (1 + amps.sum() + max([s[1] for s in sp_["spicules"]], default=0)) + 2
        n0 = int(math.ceil(reach)) * 2 + 1
        # The label patch's frame, widened so the blurred edge is not cut off.
        grow = int(math.ceil(3 * psf_sigma_px))
        n = n0 + 2 * grow
        x0, y0 = x0 - grow, y0 - grow
        c = n0 // 2 + grow
        off = (c + sp_["subpixel"][0], c + sp_["subpixel"][1])
        # Work in a padded window around the patch.
        wy0, wx0 = max(0, y0 - pad), max(0, x0 - pad)
        wy1, wx1 = min(hu.shape[0], y0 + n + pad), min(hu.shape[1], x0 + n + pad)
        win = (slice(wy0, wy1), slice(wx0, wx1))
        bg = out[win].copy()
        alpha = np.zeros(bg.shape, np.float32)
        _paste(alpha, partial_volume(sp_, R, (n, n), off, psf_sigma_px=psf_sigma_px), y0 - wy0, x0 - wx0)
        values = draw_lesion_hu(f["kind"], rng)
        low = local_mean(bg, clean[win], sp)
        res = bg - low
        p = {"instance": f["instance"], "mode": mode, **{k: round(v, 2) for k, v in values.items()},
             "local_mean_hu": round(float(np.median(low[alpha > 0.5])), 2) if (alpha > 0.5).any() else None}
        if mode == "disc":
            L = values.get("solid_hu", values.get("ground_glass_hu"))
            out[win] = bg * (1 - alpha) + alpha * L
            params.append(p)
            continue
        if mode == "disc_white":
            L = values.get("solid_hu", values.get("ground_glass_hu"))
            wn = rng.standard_normal(bg.shape).astype(np.float32) * noise.std_hu
            out[win] = bg * (1 - alpha) + alpha * (L + wn)
            params.append(p)
            continue
        mean = low.copy()
        solid_alpha = np.zeros_like(alpha)
        if "ground_glass_hu" in values:
            # One contrast for the whole lesion (against the local mean under it), so the background's texture
            # at every scale stays, as in partly filled air spaces.
            base = float(np.median(low[alpha > 0.5])) if (alpha > 0.5).any() else float(np.median(low))
            mean = mean + alpha * (values["ground_glass_hu"] - base)
        if f["kind"] == "solid":
            solid_alpha = alpha
        elif f["kind"] == "part_solid":
            ac = partial_volume(sp_, R * sp_["solid_fraction"], (n, n), off, spicules=False, psf_sigma_px=psf_sigma_px)
            _paste(solid_alpha, ac, y0 - wy0, x0 - wx0)
        if solid_alpha.any():
            mean = mean * (1 - solid_alpha) + solid_alpha * values["solid_hu"]
            synth = synthesize_noise((64, 64), noise, rng)
            # The lesion's interior as the noise is measured there (annotators/ct_insertion.inner_region).
            core = np.pad((solid_alpha >= 0.5).astype(np.uint8), 1)
            inner = cv2.distanceTransform(core, cv2.DIST_L2, 5)[1:-1, 1:-1] >= max(2.5, 0.5 + 3 * psf_sigma_px)
            if inner.sum() < 6:
                inner = solid_alpha > 0.98
            target = local_noise_var(out, clean, inner, (wy0, wx0), sp, R) if inner.sum() >= 6 else None
            synth = _fit(synth, bg.shape)
            if target is not None:
                # Amplitude at the lesion's own scale: this realisation's plane-detrended variance over the
                # lesion's interior equals the parenchyma's over the same shape nearby.
                iy, ix = np.nonzero(inner)
                got = _plane_var(synth[iy, ix], iy, ix)
                if got > 0:
                    synth *= math.sqrt(target / got)
                p["local_noise_std_hu"] = round(math.sqrt(target), 3)
            th = np.clip(solid_alpha, 0, 1) * (np.pi / 2)
            out[win] = mean + np.cos(th) * res + np.sin(th) * synth
        else:
            out[win] = mean + res
        params.append(p)
    np.clip(out, -1024, 3071, out=out)
    return out, params


def _plane_var(values: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> float:
    A = np.stack([np.ones_like(xs, dtype=np.float64), xs, ys], 1)
    coef, *_ = np.linalg.lstsq(A, values.astype(np.float64), rcond=None)
    return float(((values - A @ coef) ** 2).mean())


def local_noise_var(img: np.ndarray, clean: np.ndarray, inner: np.ndarray, origin: tuple[int, int], sp: float,
                    radius_px: float) -> float | None:
    """Plane-detrended variance of the parenchyma over the lesion's interior shape moved to clean spots around it
    (>= 3 px from vessels; up to 8 directions, 2.2-4x the radius away); None when no spot is clean."""
    ys, xs = np.nonzero(inner)
    ys, xs = ys + origin[0], xs + origin[1]
    h, w = img.shape
    clean = cv2.erode(clean.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0  # >= 3 px from vessels
    vals = []
    for dist in (2.2, 3.0, 4.0):
        d = dist * (radius_px + 0.75) + 2.0 / sp
        for k in range(8):
            a = k * math.pi / 4
            yy, xx = ys + int(round(d * math.sin(a))), xs + int(round(d * math.cos(a)))
            if yy.min() < 0 or xx.min() < 0 or yy.max() >= h or xx.max() >= w or not clean[yy, xx].all():
                continue
            vals.append(_plane_var(img[yy, xx], yy, xx))
        if len(vals) >= 3:
            break
    return float(np.mean(vals)) if vals else None


def _fit(field_: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if field_.shape[0] >= shape[0] and field_.shape[1] >= shape[1]:
        return field_[: shape[0], : shape[1]]
    reps = (-(-shape[0] // field_.shape[0]), -(-shape[1] // field_.shape[1]))
    return np.tile(field_, reps)[: shape[0], : shape[1]]


# ------------------------------------------------------------------------------------------------ the layout
def choose_slice(scan: Scan, rng: np.random.Generator) -> tuple[int, float | None]:
    """A slice with lung in it (at least half the largest lung area of the scan), and its level 0..1 in the lung's
    craniocaudal extent (None for single slices)."""
    z = scan.hu.shape[0]
    if z == 1:
        return 0, None
    area = (scan.hu < -400).reshape(z, -1).sum(1).astype(float)
    if scan.labels is not None:
        lung_ids = list(LOBES.values()) + list(SIDE_IDS.values())
        la = np.isin(scan.labels, lung_ids).reshape(z, -1).sum(1).astype(float)
        if la.max() > 0:
            area = la
    ok = np.nonzero(area >= 0.5 * area.max())[0]
    k = int(ok[int(rng.integers(ok.size))])
    has = np.nonzero(area >= 0.05 * area.max())[0]
    level = (k - has.min()) / max(1, has.max() - has.min())
    return k, float(level)


def source_layout(spec: Any, request: SampleRequest, rng: np.random.Generator) -> Layout:
    """Layout of a sample from the user's scan: a slice of the planned source, its labels, the placed findings."""
    src = spec.source
    unit = src.units[request.params["source_unit"]]
    scan = load_scan(unit, src)
    k, level = choose_slice(scan, rng)
    if level is None:
        level = src.level
    hu = scan.hu[k]
    sp = scan.spacing_mm
    labels = scan.labels[k] if scan.labels is not None else None
    label, region, info = slice_regions(hu, sp, labels, src.lobes, level)
    lung = region > 0
    vessels = vessel_mask(hu, lung, sp)
    if labels is not None:
        vessels |= np.isin(labels, [C["pulmonary_vessel"], C["airway_wall"], C["airway_lumen"], C["nodule_solid"],
                                     C["nodule_ground_glass"]])
    clean = lung & ~vessels
    instance = np.zeros(hu.shape, np.uint16)
    placed = place_findings(region, vessels, request.findings, sp, rng, label, instance)
    noise = estimate_noise(hu, clean & (instance == 0), sp)
    psf = estimate_edge_blur(hu, lung)
    params = {"psf_sigma_px": round(psf, 4), "source": {"id": scan.source_id, "sha256": scan.sha256, "slice": k, "level": level,
                         "geometry": scan.geometry, **info},
              "noise": noise.record()}
    return Layout(label=label, instance=instance, spacing_mm=sp, findings=placed, params=params,
                  extras={"source_hu": hu, "region": region, "vessels": vessels, "clean": clean,
                          "noise_nps": noise.nps, "noise_std": np.float32(noise.std_hu),
                          "psf_sigma_px": np.float32(psf)})


def render_insertion(layout: Layout, rng: np.random.Generator, mode: str = "matched") -> tuple[np.ndarray, dict]:
    """The renderer's part: blend the placed findings into the source slice."""
    sp = layout.spacing_mm
    nps = layout.extras["noise_nps"]
    from generators.ct_sources import mean_frequency

    noise = NoiseModel(std_hu=float(layout.extras["noise_std"]), nps=nps, roi_px=nps.shape[0], n_rois=0,
                       spacing_mm=sp, mean_frequency=mean_frequency(nps, sp))
    img, params = insert_intensities(layout.extras["source_hu"], layout.extras["clean"], layout.findings, sp, noise,
                                     rng, mode, float(layout.extras["psf_sigma_px"]))
    return img, {"insertion": params, "method": "image-domain insertion, local-mean replacement, NPS-matched noise"}


def scan_context(hu: np.ndarray, sp: float, labels: np.ndarray | None = None, lobes: str = "none",
                 level: float | None = None) -> dict[str, Any]:
    """Everything insertion needs of one slice (used by the bench and the gallery without a spec)."""
    label, region, info = slice_regions(hu, sp, labels, lobes, level)
    lung = region > 0
    vessels = vessel_mask(hu, lung, sp)
    clean = lung & ~vessels
    return {"label": label, "region": region, "vessels": vessels, "clean": clean,
            "noise": estimate_noise(hu, clean, sp), "psf_sigma_px": estimate_edge_blur(hu, lung), "info": info}


# ------------------------------------------------------------------------------------------------ registration
@register_layout("chest_ct")
def chest_ct_or_source_layout(spec: Any, request: SampleRequest, rng: np.random.Generator) -> Layout:
    """The chest-CT layout: the user's scan when the spec names a ``source``, else the phantom."""
    if getattr(spec, "source", None) is not None:
        return source_layout(spec, request, rng)
    return chest_ct_layout(spec, request, rng)


@register_renderer
class ProceduralCTWithSources(ProceduralCT):
    """The procedural CT renderer, which also blends findings into real scans (layouts with ``source_hu``)."""

    def check_spec(self, spec: Any) -> None:
        super().check_spec(spec)
        if getattr(spec, "source", None) is not None:
            from generators.ct_sources import check_sources

            check_sources(spec.source)

    def render(self, layout: Layout, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        if "source_hu" in layout.extras:
            return render_insertion(layout, rng)
        return super().render(layout, rng)
