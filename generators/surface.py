"""Surface-defect layout (defects placed at exact physical size inside their regions) and the procedural
renderer (material background or the user's photo, defect appearance models, camera model).

Layout: label uint8 (SURFACE_CLASSES), instance uint16, extras["height_mm"] (float32, depressions < 0) and
extras["profile"] (0..1 core-to-border profile of each defect), extras["foreground"] for photos.
Renderer ``procedural``: draws a parameter record per step (material, camera, each defect's appearance) and applies
pure functions of it; every record goes into the render params.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from generators.base import Renderer, register_layout, register_renderer
from generators.defects import defect_shape, draw_shape_params
from generators.materials import (apply_camera, colourise, draw_camera_params, draw_material_params, material_albedo,
                                  material_palette)
from schemas.errors import PlacementError, SpecError
from schemas.sample import Layout, SampleRequest
from schemas.surface import (DEFECT_CLASS, EDGES, OUTSIDE_PART, SurfaceSpec, mask_path_for, part_box,
                             region_box)

MAX_PLACEMENT_TRIES = 60
GAP_MM = 0.5  # defects keep this distance from each other so each one is measured alone


# ------------------------------------------------------------------------------------------------- photos

@lru_cache(maxsize=16)
def load_photo(path: str, color: str) -> np.ndarray:
    """A user's photo as uint8 (HxW grey or HxWx3 RGB). Cached: reading is deterministic."""
    flag = cv2.IMREAD_COLOR if color == "rgb" else cv2.IMREAD_GRAYSCALE
    img = cv2.imread(path, flag)
    if img is None:
        raise SpecError(f"photo {path!r} cannot be read; accepted: PNG or JPEG files")
    if color == "rgb":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    img.setflags(write=False)
    return img


@lru_cache(maxsize=16)
def photo_foreground(path: str, masks_folder: str | None, mode: str) -> np.ndarray:
    """Foreground of a photo: the user's mask (non-zero = part), Otsu's threshold (largest component, holes
    filled; the class touching the image border less is the part), or everything."""
    grey = load_photo(path, "grey")
    if masks_folder:
        mp = mask_path_for(Path(path), masks_folder)
        m = cv2.imread(str(mp), cv2.IMREAD_GRAYSCALE) if mp else None
        if m is None or m.shape != grey.shape:
            raise SpecError(f"foreground mask for photo {Path(path).name!r} is missing, unreadable or not the photo's "
                            "size; accepted: a PNG of the same size, non-zero on the part")
        fg = m > 0
    elif mode == "none":
        fg = np.ones(grey.shape, bool)
    else:
        blur = cv2.GaussianBlur(grey, (5, 5), 0)
        _, th = cv2.threshold(blur, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        border = np.concatenate([th[0], th[-1], th[:, 0], th[:, -1]])
        fg = th.astype(bool) if border.mean() < 0.5 else ~th.astype(bool)
        n, lab, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
        if n > 1:
            fg = lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        # fill holes: background = what is reachable from the border
        inv = (~fg).astype(np.uint8)
        n2, lab2 = cv2.connectedComponents(inv, connectivity=4)
        edge_labels = set(np.unique(np.concatenate([lab2[0], lab2[-1], lab2[:, 0], lab2[:, -1]]))) - {0}
        fg = fg | (inv.astype(bool) & ~np.isin(lab2, list(edge_labels)))
    fg.setflags(write=False)
    return fg


# ------------------------------------------------------------------------------------------------- layout

def _overlaps(box, boxes) -> bool:
    y0, x0, y1, x1 = box
    return any(y0 < b[2] and b[0] < y1 and x0 < b[3] and b[1] < x1 for b in boxes)


@register_layout("surface")
def surface_layout(spec: SurfaceSpec, request: SampleRequest, rng: np.random.Generator) -> Layout:
    h, w = request.size
    sp = request.spacing_mm
    label = np.zeros((h, w), np.uint8)
    instance = np.zeros((h, w), np.uint16)
    height = np.zeros((h, w), np.float32)
    profile = np.zeros((h, w), np.float32)
    extras: dict[str, np.ndarray] = {"height_mm": height, "profile": profile}
    params: dict[str, Any] = {"material": request.params["material"], "color": request.params["color"],
                              "spacing_mm": sp, "defects": []}
    fg_allowed = None
    if request.params["material"] == "image":
        ph = spec.photos
        fg = photo_foreground(request.params["photo"], ph.masks_folder, ph.foreground)
        label[~fg] = OUTSIDE_PART
        extras["foreground"] = fg.astype(np.uint8)
        # keep defects a millimetre (at least 2 px) inside the part's outline
        r = max(2, int(round(1.0 / sp)))
        fg_allowed = cv2.erode(fg.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2))
        params["photo"] = request.params["photo"]
        if not fg_allowed.any():
            raise PlacementError(f"photo {Path(request.params['photo']).name}: no foreground to place defects in")
    pbox = part_box(extras.get("foreground"), (h, w))
    gap = max(1, int(np.ceil(GAP_MM / sp)))
    taken: list[tuple[int, int, int, int]] = []
    placed: list[dict[str, Any]] = []
    for k, f in enumerate(request.findings):
        loc = f["location"]
        if f["kind"] == "missing_material" and loc == "any":
            loc = EDGES[int(rng.integers(4))]
        edge_kind = f["kind"] == "missing_material"
        extent = f.get("length_mm") or f.get("diameter_mm") or 0.0
        ry0, rx0, ry1, rx1 = region_box(loc, pbox, sp, extent)
        shape, tries, origin = None, 0, None
        while tries < MAX_PLACEMENT_TRIES:
            tries += 1
            orient = f.get("orientation_deg")
            if orient is None and f["kind"] in ("scratch", "crack") and tries > MAX_PLACEMENT_TRIES // 3:
                # long lines in a narrow region: aim along the region's long side, tilted at most as far as fits
                short_side = min(rx1 - rx0, ry1 - ry0)
                base = 0.0 if (rx1 - rx0) >= (ry1 - ry0) else 90.0
                length_px = f["length_mm"] / sp
                tilt = np.degrees(np.arcsin(min(1.0, 0.6 * short_side / max(length_px, 1.0))))
                orient = base + float(rng.uniform(-1, 1)) * min(20.0, tilt)
            if shape is None or tries % 5 == 1 or orient is not None:
                sp_params = draw_shape_params(f, sp, rng, orient, loc if edge_kind else None)
                shape = defect_shape(sp_params)
            sh, sw = shape.mask.shape
            if edge_kind:
                if loc in ("top_edge", "bottom_edge"):
                    y = pbox[0] if loc == "top_edge" else pbox[2] - sh
                    if rx1 - rx0 < sw:
                        continue
                    x = int(rng.integers(rx0, rx1 - sw + 1))
                else:
                    x = pbox[1] if loc == "left_edge" else pbox[3] - sw
                    if ry1 - ry0 < sh:
                        continue
                    y = int(rng.integers(ry0, ry1 - sh + 1))
            elif isinstance(loc, dict):
                ys, xs = np.nonzero(shape.mask)
                cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
                y = int(round(pbox[0] + loc["y_mm"] / sp - 0.5 - cy))
                x = int(round(pbox[1] + loc["x_mm"] / sp - 0.5 - cx))
            else:
                ys, xs = np.nonzero(shape.mask)
                # the mask's own bounding box must fit the region; the crop's padding may stick out
                my0, my1, mx0, mx1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
                if (my1 - my0) > ry1 - ry0 or (mx1 - mx0) > rx1 - rx0:
                    continue
                y = int(rng.integers(ry0 - my0, ry1 - my1 + 1))
                x = int(rng.integers(rx0 - mx0, rx1 - mx1 + 1))
            ys, xs = np.nonzero(shape.mask)
            gy, gx = ys + y, xs + x
            if gy.min() < max(ry0, 0) or gx.min() < max(rx0, 0) or gy.max() >= min(ry1, h) or gx.max() >= min(rx1, w):
                continue
            box = (int(gy.min()) - gap, int(gx.min()) - gap, int(gy.max()) + 1 + gap, int(gx.max()) + 1 + gap)
            if _overlaps(box, taken):
                continue
            if fg_allowed is not None and not fg_allowed[gy, gx].all():
                continue
            origin = (y, x)
            break
        if origin is None:
            raise PlacementError(f"cannot place {f['kind']} {k + 1} ({extent:g} mm) in region {loc!r} after "
                                 f"{MAX_PLACEMENT_TRIES} tries")
        y, x = origin
        ys, xs = np.nonzero(shape.mask)
        gy, gx = ys + y, xs + x
        label[gy, gx] = DEFECT_CLASS[f["kind"]]
        instance[gy, gx] = k + 1
        height[gy, gx] = shape.height_mm[ys, xs]
        profile[gy, gx] = shape.profile[ys, xs]
        taken.append((int(gy.min()) - gap, int(gx.min()) - gap, int(gy.max()) + 1 + gap, int(gx.max()) + 1 + gap))
        rec = {**sp_params, **shape.params, "origin_px": [int(y), int(x)], "tries": tries,
               "bbox_px": [int(gy.min()), int(gx.min()), int(gy.max()) + 1, int(gx.max()) + 1]}
        params["defects"].append(rec)
        cy, cx = (gy.min() + gy.max() + 1) / 2, (gx.min() + gx.max() + 1) / 2
        placed.append({**f, "instance": k + 1, "region": loc,
                       "centre_mm": [round(float(cx * sp), 3), round(float(cy * sp), 3)],
                       "orientation_deg": sp_params.get("angle_deg") if f["kind"] in ("scratch", "crack")
                       else f.get("orientation_deg")})
    return Layout(label=label, instance=instance, spacing_mm=sp, findings=placed, params=params, extras=extras)


# ------------------------------------------------------------------------------------------------- appearance

def draw_appearance(kind: str, material: str, rng: np.random.Generator) -> dict[str, Any]:
    """Draw how one defect looks; the record is applied by ``apply_defect`` (pure)."""
    u = lambda lo, hi: round(float(rng.uniform(lo, hi)), 5)  # noqa: E731
    metal = material in ("brushed_metal", "cast_metal")
    if kind == "scratch":
        # the mode is a preference: on a surface too bright (dark) for it, the other one is used (recorded)
        mode = "specular" if rng.random() < (0.7 if metal else 0.3) else "groove"
        return {"model": mode, "alpha": u(0.6, 0.9), "delta": u(0.3, 0.55)}
    if kind == "crack":
        return {"model": "dark_crack", "alpha": u(0.75, 0.95), "target": u(0.0, 0.1)}
    if kind in ("dent", "pit"):
        return {"model": "height_shading", "light_azimuth_deg": u(0, 360),
                "gain": u(1.5, 2.5) if kind == "dent" else u(1.5, 3.0),
                "darken": u(0.05, 0.2) if kind == "dent" else u(0.45, 0.75)}
    if kind == "stain":
        return {"model": "texture_blend", "beta": u(0.0, 0.5), "stain": str(rng.choice(["oil", "rust", "dirt"])),
                "delta": u(0.3, 0.5),
                "texture_seed": int(rng.integers(0, 2**63 - 1)), "texture_cell_px": u(2.0, 6.0)}
    if kind == "hole":
        return {"model": "through_hole", "void": u(0.0, 0.08), "rim": u(0.6, 0.9), "rim_width": u(0.08, 0.2)}
    if kind == "particle":
        return {"model": str(rng.choice(["poisson", "flat"])), "bright": bool(rng.random() < 0.4),
                "light_azimuth_deg": u(0, 360), "texture_seed": int(rng.integers(0, 2**63 - 1))}
    if kind == "missing_material":
        return {"model": "revealed_background", "level": u(0.02, 0.15), "facet": u(0.3, 0.6),
                "texture_seed": int(rng.integers(0, 2**63 - 1))}
    raise ValueError(kind)


def defect_chroma(a: dict[str, Any]) -> np.ndarray | None:
    """Per-channel factor (grey level -> RGB) for defects whose colour is not the material's, else None."""
    if a["model"] == "texture_blend":
        col = np.array(_STAIN_COLORS[a["stain"]])
        chroma = col / (0.3 * col[0] + 0.59 * col[1] + 0.11 * col[2])
        return (1 - a["beta"]) * chroma + a["beta"] * 1.0  # DRAEM's blend keeps beta of the surface (near neutral)
    if a.get("applied") == "specular" or a["model"] in ("through_hole", "revealed_background", "poisson", "flat"):
        return np.ones(3)
    return None


_STAIN_COLORS = {"oil": (0.18, 0.16, 0.12), "rust": (0.55, 0.25, 0.08), "dirt": (0.35, 0.3, 0.22)}


def _shading(height_mm: np.ndarray, spacing_mm: float, azimuth_deg: float) -> np.ndarray:
    gy, gx = np.gradient(height_mm / spacing_mm)  # slope (mm per mm)
    a = np.deg2rad(azimuth_deg)
    return (gx * np.cos(a) + gy * np.sin(a)).astype(np.float32)


def apply_defect(img: np.ndarray, sl: tuple[slice, slice], m: np.ndarray, prof: np.ndarray, hgt: np.ndarray,
                 a: dict[str, Any], spacing_mm: float) -> None:
    """Pure appearance model on a crop of the albedo image (in place, only pixels inside the mask ``m`` change)."""
    crop = img[sl]
    rgb = crop.ndim == 3
    mm = m[..., None] if rgb else m
    model = a["model"]
    local = float(crop[~m].mean()) if (~m).any() else 0.5
    if model in ("specular", "groove", "dark_crack"):
        al = (a["alpha"] * (0.55 + 0.45 * prof))
        al = al[..., None] if rgb else al
        if model == "dark_crack":
            tgt = a["target"]
        else:
            up = model == "specular"
            if up and local + a["delta"] > 1.0:
                up = False
            elif not up and local - a["delta"] < 0.0:
                up = True
            a["applied"] = "specular" if up else "groove"
            tgt = float(np.clip(local + (a["delta"] if up else -a["delta"]), 0, 1)) / max(float(a["alpha"]), 1e-6)
            tgt = float(np.clip(tgt, 0, 1.2))
        new = crop * (1 - al) + al * tgt
    elif model == "height_shading":
        sh = _shading(hgt, spacing_mm, a["light_azimuth_deg"])
        depth_rel = -hgt / max(float(-hgt.min()), 1e-6)
        f = np.clip(1 + a["gain"] * sh - a["darken"] * depth_rel, 0.3, 1.7)
        new = crop * (f[..., None] if rgb else f)
    elif model == "texture_blend":
        g = np.random.default_rng(a["texture_seed"])
        h, w = m.shape
        c = max(2.0, a["texture_cell_px"])
        noise = cv2.resize(g.random((int(h / c) + 2, int(w / c) + 2), dtype=np.float32), (w, h),
                           interpolation=cv2.INTER_CUBIC)
        col = np.float32(_STAIN_COLORS[a["stain"]])
        # the stain's tone sits delta away from the surface (darker unless the surface is too dark for it)
        tone = local - a["delta"] if local - a["delta"] >= 0.05 else min(local + a["delta"], 0.95)
        a["tone"] = round(tone, 4)
        col = col * np.float32(tone / float(col.mean()))
        tex = (0.75 + 0.5 * noise)[..., None] * col if rgb else (0.75 + 0.5 * noise) * float(col.mean())
        # DRAEM: out = img (1 - m) + (1 - beta) tex m + beta img m
        new = (1 - a["beta"]) * tex + a["beta"] * crop
    elif model == "through_hole":
        inner = prof > a["rim_width"]
        val = np.where(inner, a["void"], a["rim"]).astype(np.float32)
        new = val[..., None] * np.ones_like(crop) if rgb else val
    elif model in ("poisson", "flat"):
        sh = _shading(hgt, spacing_mm, a["light_azimuth_deg"])
        base = 0.85 if a["bright"] else 0.12
        g = np.random.default_rng(a["texture_seed"])
        grain = (g.random(m.shape, dtype=np.float32) - 0.5) * 0.1
        part = np.clip(base + grain + 3.0 * sh, 0, 1).astype(np.float32)
        if model == "flat" or min(m.shape) < 8:
            new = part[..., None] * np.ones_like(crop) if rgb else part
        else:
            # NSA: Poisson blending (OpenCV seamlessClone) of the particle patch into the surface
            dst = np.clip(crop * 255, 0, 255).astype(np.uint8)
            src = np.clip(part * 255, 0, 255).astype(np.uint8)
            dst3 = dst if rgb else cv2.merge([dst] * 3)
            src3 = cv2.merge([src] * 3)
            mask8 = m.astype(np.uint8) * 255
            mask8[0], mask8[-1], mask8[:, 0], mask8[:, -1] = 0, 0, 0, 0
            ys, xs = np.nonzero(mask8)
            if len(ys) == 0:
                new = part[..., None] * np.ones_like(crop) if rgb else part
            else:
                cy, cx = (ys.min() + ys.max() + 1) // 2, (xs.min() + xs.max() + 1) // 2
                out = cv2.seamlessClone(src3, dst3, mask8, (int(cx), int(cy)), cv2.NORMAL_CLONE)
                out = out.astype(np.float32) / 255
                new = out if rgb else out[..., 0]
                # Poisson keeps the surface's level at the border; push the core toward the particle's own tone
                k = prof[..., None] if rgb else prof
                new = new * (1 - 0.6 * k) + 0.6 * k * (part[..., None] if rgb else part)
    elif model == "revealed_background":
        g = np.random.default_rng(a["texture_seed"])
        lvl = a["level"] + 0.03 * g.random(m.shape, dtype=np.float32)
        lvl = np.where(prof > 0.85, a["facet"] * (0.8 + 0.2 * prof), lvl).astype(np.float32)
        new = lvl[..., None] * np.ones_like(crop) if rgb else lvl
    else:
        raise ValueError(model)
    np.copyto(crop, new.astype(np.float32), where=mm if new.shape == crop.shape else np.broadcast_to(mm, crop.shape))


@register_renderer
class SurfaceProceduralRenderer(Renderer):
    """CPU renderer for surface defects: procedural materials (or the user's photos) + defect appearance models."""

    name = "procedural"
    version = "surface-1"
    domains = ("surface",)
    options_accepted = ()

    def render(self, layout: Layout, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        h, w = layout.label.shape
        material = layout.params["material"]
        color = layout.params["color"]
        sp = layout.spacing_mm
        rparams: dict[str, Any] = {"color": color}
        photo = material == "image"
        if photo:  # the user's photo, in its own colours
            img = load_photo(layout.params["photo"], color).astype(np.float32) / 255.0
            rparams["photo"] = layout.params["photo"]
        else:  # procedural: grey albedo now, colours by lookup after the camera model
            mp = draw_material_params(material, rng)
            rparams["material"] = mp
            img = material_albedo(material, mp, (h, w), sp)
        if not img.flags.writeable or img.dtype != np.float32:
            img = img.astype(np.float32)
        appearances, overrides = [], []
        hgt_all, prof_all = layout.extras["height_mm"], layout.extras["profile"]
        for f in layout.findings:
            k = f["instance"]
            a = draw_appearance(f["kind"], material, rng)
            y0, x0, y1, x1 = layout.params["defects"][k - 1]["bbox_px"]
            # one pixel of context for gradients
            sl = (slice(max(y0 - 1, 0), min(y1 + 1, h)), slice(max(x0 - 1, 0), min(x1 + 1, w)))
            m = layout.instance[sl] == k
            apply_defect(img, sl, m, prof_all[sl], hgt_all[sl], a, sp)
            appearances.append({"instance": k, **a})
            chroma = defect_chroma(a)
            if chroma is not None:
                overrides.append((sl, m, chroma))
        rparams["defects"] = appearances
        cam = draw_camera_params(rng, photo)
        rparams["camera"] = cam
        out = apply_camera(img, cam)
        if color == "rgb" and not photo:
            grey8 = out
            out = colourise(grey8, material_palette(material, mp))
            for sl, m, chroma in overrides:  # defects with their own colour: stains, white highlights, voids
                crop = out[sl]
                crop[m] = np.clip(grey8[sl][m][:, None] * chroma[None, :], 0, 255).astype(np.uint8)
        return out, rparams


# ----------------------------------------------------------------------------------------------------------------
# ControlNet hooks (generators.controlnet looks them up through the domain description): prompt text, the
# surface-only option color, and 8-bit output. Pure numpy, so importing them loads no torch.
def _num(v: Any) -> str:
    return f"{round(float(v), 1):g}"


def describe_surface_finding(f: dict) -> str:
    """'5 mm long scratch at the top left' from a placed surface defect."""
    kind = str(f.get("kind", "defect")).replace("_", " ")
    if f.get("length_mm"):
        size = f"{_num(f['length_mm'])} mm long "
    elif f.get("diameter_mm"):
        size = f"{_num(f['diameter_mm'])} mm "
    else:
        size = ""
    loc = f.get("location")
    where = f" at the {str(loc).replace('_', ' ')}" if isinstance(loc, str) and loc not in ("any", "") else ""
    return f"{size}{kind}{where}"


class ControlNetHooks:
    """What the controlnet renderer needs to know about surface images."""

    default_prompt = "close-up {color} photo of a {material} surface, {findings}"
    prompt_fields = frozenset({"findings", "material", "color"})

    def configure(self, options: dict[str, Any]) -> dict[str, Any]:
        if "hu_window" in options:
            raise SpecError("option hu_window applies to chest_ct only; surface images are 8-bit")
        color = options.get("color", "grey")
        if color not in ("grey", "rgb"):
            raise SpecError(f"option color: {color!r} is not accepted; accepted: grey, rgb")
        return {"color": color}

    def image_size(self, spec: Any, options: dict[str, Any], state: dict[str, Any]) -> tuple[int, int]:
        want = spec.image.color
        if "color" in options and options["color"] != want:
            raise SpecError(f"option color {options['color']!r} contradicts image.color {want!r}; "
                            "drop the option or make them agree")
        state["color"] = want
        return spec.image.hw

    def prompt_fields_for(self, layout: Layout, state: dict[str, Any]) -> dict[str, str]:
        findings = ", ".join(describe_surface_finding(f) for f in layout.findings) or "no defect"
        material = str(layout.params.get("material") or "metal").replace("_", " ")
        return {"findings": findings, "material": material,
                "color": "greyscale" if state["color"] == "grey" else "colour"}

    def to_image(self, rgb: np.ndarray, state: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        if state["color"] == "rgb":
            return np.round(rgb * 255.0).astype(np.uint8), {"type": "uint8_rgb"}
        return np.round(rgb.mean(axis=2) * 255.0).astype(np.uint8), {"type": "uint8_grey", "grey": "mean of R, G, B"}


CONTROLNET = ControlNetHooks()
