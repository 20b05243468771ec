"""Industrial surface-defect domain: the spec model, the class table, defect findings, regions and the planner.

Sizes are millimetres; the field of view (mm across the image width) fixes mm per pixel. Region geometry lives
here (pure functions, no randomness) so that the layout and the annotator judge "inside the region" alike.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.domain import Domain, register_domain
from schemas.errors import SpecError
from schemas.plan import uniform
from schemas.spec import BaseSpec, QCSpec
from schemas.surface_findings import (  # noqa: F401  (re-exported: schemas.surface is the domain's module)
    DOMAIN, SURFACE_CLASSES, OUTSIDE_PART, DefectKind, DEFECT_KINDS, DEFECT_CLASS, LINEAR_KINDS, ROUND_KINDS,
    EDGE_KINDS, Material, MATERIALS, QUADRANTS, EDGES, NAMED_REGIONS, EDGE_BAND, ACCEPTED_REGIONS,
    DEFAULT_WIDTH_MM, DEFAULT_DEPTH_MM, PointMM, SurfaceDefect, normalise_region)
from schemas.units import MmRange, UnitRange
from schemas.wording import expand_mixture


class SurfaceImageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int | tuple[int, int] = Field(512, description="pixels: a side, or [height, width]")
    color: Literal["grey", "rgb"] = "grey"

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        hw = (v, v) if isinstance(v, int) else tuple(v)
        if len(hw) != 2 or not all(64 <= s <= 4096 for s in hw):
            raise ValueError(f"image.size {v!r} is outside the accepted 64 to 4096 pixels per side")
        return v

    @property
    def hw(self) -> tuple[int, int]:
        return (self.size, self.size) if isinstance(self.size, int) else (int(self.size[0]), int(self.size[1]))


class PhotoSpec(BaseModel):
    """The user's good-part photos for material ``image``."""

    model_config = ConfigDict(extra="forbid")
    folder: str = Field(description="folder of PNG/JPEG photos of good parts")
    masks_folder: str | None = Field(None, description="optional folder of foreground masks named like the photos")
    foreground: Literal["otsu", "none"] = Field("otsu", description="foreground when no mask is given")


class SurfaceSource(BaseModel):
    """``source:`` for surfaces: a folder of the user's part photos and, optionally, masks of where defects may go
    (non-zero = allowed, named like the photos). The same route as CT scans: samples go to photos in contiguous
    blocks, each sample's ``group`` is its photo's id (``src-`` + the start of its sha256), and the spec hash covers
    the photos' bytes."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="folder of PNG/JPEG photos of good parts")
    masks: str | None = Field(None, description="folder of masks (non-zero = where defects may go)")
    content_sha256: str | None = Field(None, description="filled in by pairforge: sha256 over every photo and mask")

    @model_validator(mode="after")
    def _hash(self) -> "SurfaceSource":
        from schemas.source import file_sha256

        h = __import__("hashlib").sha256()
        for f in list_photos(self.path):
            h.update(file_sha256(str(f)).encode())
        if self.masks is not None:
            mdir = Path(os.path.expanduser(self.masks))
            if not mdir.is_dir():
                raise ValueError(f"source.masks {self.masks!r} is not a readable folder")
            for f in sorted(p for p in mdir.iterdir() if p.is_file()):
                h.update(file_sha256(str(f)).encode())
        self.content_sha256 = h.hexdigest()
        return self


class SurfaceDefects(BaseModel):
    model_config = ConfigDict(extra="forbid")
    negatives: float = Field(0.2, ge=0, le=1, description="share of defect-free samples (empty mask)")
    mixture: list[SurfaceDefect] = Field(default_factory=list)

    @field_validator("mixture", mode="before")
    @classmethod
    def _shorthand(cls, v):
        from schemas.surface_shorthand import parse_defect_text

        # The material a text names is taken by SurfaceSpec._material_from_shorthand.
        return expand_mixture(v, lambda text: parse_defect_text(text)[0].model_dump(), "defects.mixture", "defects")

    @model_validator(mode="after")
    def _needed(self) -> "SurfaceDefects":
        if self.negatives < 1 and not self.mixture:
            raise ValueError("defects.mixture is empty but defects.negatives < 1; add defects or set negatives: 1")
        return self


class SurfaceQCSpec(QCSpec):
    """QC for surface defects. ``cnr_min`` is the defect contrast: RMS deviation of the defect pixels from the
    mean of a ring around them, in units of the ring's standard deviation (floored at 2 grey levels)."""

    cnr_min: float = Field(1.5, ge=0, description="minimum defect contrast (RMS deviation / surround std)")
    size_tolerance_mm: float = Field(0.2, ge=0, description="allowed |measured - requested| size (or 1 pixel)")
    min_in_region: float = Field(1.0, ge=0, le=1, description="share of a defect's pixels inside its region")


class SurfaceSpec(BaseSpec):
    """A dataset of surface images (procedural materials or the user's photos) with defect masks."""

    domain: Literal["surface"] = DOMAIN
    material: Material | None = Field(None, description="surface material; 'image' uses the user's photos")
    field_of_view_mm: MmRange("field_of_view_mm") = Field((50.0, 50.0), description="mm across the image width")
    image: SurfaceImageSpec = Field(default_factory=SurfaceImageSpec)
    photos: PhotoSpec | None = None
    source: SurfaceSource | None = Field(None, exclude_if=lambda v: v is None,
                                         description="the user's part photos (and masks of where defects may go); "
                                                     "sets material 'image'")
    defects: SurfaceDefects = Field(default_factory=SurfaceDefects)
    qc: SurfaceQCSpec = Field(default_factory=SurfaceQCSpec)

    @model_validator(mode="before")
    @classmethod
    def _material_from_shorthand(cls, data: Any):
        if not isinstance(data, dict):
            return data
        src = data.get("source")
        if isinstance(src, dict):  # source: is the photos route, read the same way as CT sources
            if data.get("photos") is not None:
                raise ValueError("give the photos once: source: or photos:, not both")
            if data.get("material") not in (None, "image"):
                raise ValueError(f"source: photos make the material 'image', not {data['material']!r}")
            data = {**data, "material": "image",
                    "photos": {"folder": src.get("path"), "masks_folder": src.get("masks"),
                               "foreground": "otsu" if src.get("masks") is None else "none"}}
        mats = set()
        defects = data.get("defects")
        if isinstance(defects, dict) and isinstance(defects.get("mixture"), list):
            from schemas.surface_shorthand import parse_defect_text
            for item in defects["mixture"]:
                text = item if isinstance(item, str) else item.get("text") if isinstance(item, dict) else None
                if isinstance(text, str):
                    try:
                        _, m = parse_defect_text(text)
                    except SpecError:
                        continue  # reported with its position by the mixture validator
                    if m:
                        mats.add(m)
        if len(mats) > 1:
            raise ValueError(f"the defects name different materials ({', '.join(sorted(mats))}); one dataset has "
                             "one material")
        if mats:
            m = mats.pop()
            if data.get("material") not in (None, m):
                raise ValueError(f"material {data['material']!r} contradicts {m!r} named in defects.mixture")
            data = {**data, "material": m}
        return data

    @field_validator("field_of_view_mm")
    @classmethod
    def _fov(cls, v):
        if v[0] < 1 or v[1] > 2000:
            raise ValueError(f"field_of_view_mm {v[0]:g}-{v[1]:g} is outside the accepted 1 to 2000 mm")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "SurfaceSpec":
        if self.material is None:
            raise ValueError(f"material is missing; accepted: {', '.join(MATERIALS)}")
        if self.material == "image":
            if self.photos is None:
                raise ValueError("material 'image' needs photos: {folder: ...} with the good-part photos")
            check_photos(self.photos, self.image.hw)
        elif self.photos is not None:
            raise ValueError(f"photos are only used with material 'image', not {self.material!r}")
        h, w = self.image.hw
        px_max = self.field_of_view_mm[1] / w
        fov_w, fov_h = self.field_of_view_mm[0], self.field_of_view_mm[0] * h / w
        for i, d in enumerate(self.defects.mixture):
            where = f"defects.mixture[{i}] ({d.kind})"
            if d.width_mm is None and d.kind in LINEAR_KINDS + EDGE_KINDS:
                lo, hi = DEFAULT_WIDTH_MM[d.kind]
                lo = max(lo, float(np.ceil(1.5 * px_max * 1e4) / 1e4))
                d.width_mm = (lo, max(hi, round(2 * lo, 4)))
                if d.kind in LINEAR_KINDS and d.width_mm[1] > 0.5 * d.length_mm[0]:
                    raise ValueError(f"{where}: length {d.length_mm[0]:g} mm is too short for a line of the "
                                     f"{d.width_mm[0]:g} mm (1.5 pixels) minimum width; accepted: at least "
                                     f"{2 * d.width_mm[1]:g} mm, or lower field_of_view_mm")
            room = region_room_mm(d.location, fov_h, fov_w, d.kind)
            if d.extent_mm() > room:
                raise ValueError(f"{where}: size {d.extent_mm():g} mm is larger than its region holds in a "
                                 f"{fov_w:g} x {fov_h:g} mm field of view; accepted: up to {room:.1f} mm, or raise "
                                 "field_of_view_mm")
            if d.kind in LINEAR_KINDS and d.orientation_deg is not None and not isinstance(d.location, PointMM):
                rh, rw = region_size_mm(d.location, fov_h, fov_w)
                L = d.length_mm[1]
                th = np.deg2rad(np.linspace(d.orientation_deg[0], d.orientation_deg[1], 37))
                # the line's box at each allowed angle (a tenth of its length of sideways wander) must fit
                bw = L * np.abs(np.cos(th)) + 0.1 * L * np.abs(np.sin(th))
                bh = L * np.abs(np.sin(th)) + 0.1 * L * np.abs(np.cos(th))
                if not np.any((bw <= 0.95 * rw) & (bh <= 0.95 * rh)):
                    o = d.orientation_deg
                    ang = f"{o[0]:g}" if o[0] == o[1] else f"{o[0]:g}-{o[1]:g}"
                    raise ValueError(f"{where}: a {L:g} mm line at {ang} degrees does not fit region "
                                     f"{d.location} ({rw:.1f} x {rh:.1f} mm); accepted: another orientation, a "
                                     "shorter line or a larger region")
            if isinstance(d.location, PointMM) and (d.location.x_mm > fov_w or d.location.y_mm > fov_h):
                raise ValueError(f"{where}: location ({d.location.x_mm:g}, {d.location.y_mm:g}) mm is outside the "
                                 f"{fov_w:g} x {fov_h:g} mm field of view")
            smallest = d.width_mm[0] if d.width_mm else d.diameter_mm[0]
            need = 1.5 * px_max if d.width_mm else 3 * px_max
            if smallest < need - 1e-9:
                what = "width" if d.width_mm else "diameter"
                raise ValueError(f"{where}: {what} {smallest:g} mm is under {need / px_max:g} pixels at "
                                 f"{px_max:.3g} mm per pixel; accepted: at least {need:.3g} mm, or lower "
                                 "field_of_view_mm or raise image.size")
            if d.kind in EDGE_KINDS and self.material == "image":
                raise ValueError(f"{where}: missing_material is drawn on procedural materials only; on photos use "
                                 "another defect kind")
        return self

    @property
    def hw(self) -> tuple[int, int]:
        return self.image.hw


def region_size_mm(location: str, fov_h: float, fov_w: float) -> tuple[float, float]:
    """(height, width) in mm of a named region of the whole field of view."""
    if location == "any":
        return fov_h, fov_w
    if location in ("top_edge", "bottom_edge"):
        return EDGE_BAND * fov_h, fov_w
    if location in ("left_edge", "right_edge"):
        return fov_h, EDGE_BAND * fov_w
    return 0.5 * fov_h, 0.5 * fov_w


def region_room_mm(location: str | PointMM, fov_h: float, fov_w: float, kind: str) -> float:
    """The largest defect extent a region can hold: lines along the region's longer side, round defects across its
    shorter side, chipped edges along their edge (90 % of it). Impossible specs are rejected up front."""
    if isinstance(location, PointMM):
        return min(fov_h, fov_w)
    if kind in EDGE_KINDS:
        along = fov_w if location in ("top_edge", "bottom_edge", "any") else fov_h
        return 0.9 * along
    bh, bw = {"any": (1.0, 1.0)}.get(location, (0.5, 0.5))
    if location in ("top_edge", "bottom_edge"):
        bh, bw = EDGE_BAND, 1.0
    elif location in ("left_edge", "right_edge"):
        bh, bw = 1.0, EDGE_BAND
    h, w = bh * fov_h, bw * fov_w
    return 0.9 * max(h, w) if kind in LINEAR_KINDS else 0.9 * min(h, w)


# ----------------------------------------------------------------------------------------------------------------
# Photos (material "image")

PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg")


def list_photos(folder: str) -> list[Path]:
    p = Path(os.path.expanduser(folder))
    if not p.is_dir():
        raise ValueError(f"photos.folder {folder!r} is not a readable folder")
    try:
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in PHOTO_SUFFIXES and f.is_file())
    except OSError as e:
        raise ValueError(f"photos.folder {folder!r} cannot be read: {e}") from None
    if not files:
        raise ValueError(f"photos.folder {folder!r} holds no photos; accepted: {', '.join(PHOTO_SUFFIXES)} files")
    return files


def mask_path_for(photo: Path, masks_folder: str) -> Path | None:
    folder = Path(os.path.expanduser(masks_folder))
    for cand in (folder / f"{photo.stem}.png", folder / f"{photo.stem}_mask.png", folder / photo.name):
        if cand.is_file():
            return cand
    return None


def check_photos(photos: PhotoSpec, hw: tuple[int, int]) -> None:
    from PIL import Image

    files = list_photos(photos.folder)
    if photos.masks_folder is not None and not Path(os.path.expanduser(photos.masks_folder)).is_dir():
        raise ValueError(f"photos.masks_folder {photos.masks_folder!r} is not a readable folder")
    for f in files:
        try:
            with Image.open(f) as im:
                w, h = im.size
        except Exception as e:  # PIL raises several types for broken files
            raise ValueError(f"photo {f.name!r} in {photos.folder!r} cannot be read ({type(e).__name__})") from None
        if (h, w) != tuple(hw):
            raise ValueError(f"photo {f.name!r} is {w}x{h} pixels but image.size is {hw[1]}x{hw[0]} (width x height); "
                             "accepted: photos of exactly image.size, or set image.size to [height, width]")
        if photos.masks_folder is not None:
            m = mask_path_for(f, photos.masks_folder)
            if m is None:
                raise ValueError(f"no foreground mask for photo {f.name!r} in {photos.masks_folder!r}; accepted "
                                 f"names: {f.stem}.png or {f.stem}_mask.png")


# ----------------------------------------------------------------------------------------------------------------
# Regions: boxes in pixels from the region name, image size and the part's bounding box.

def part_box(foreground: np.ndarray | None, hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of the part: the foreground's bounding box, or the whole image."""
    if foreground is None:
        return 0, 0, hw[0], hw[1]
    ys = np.flatnonzero(foreground.any(axis=1))
    xs = np.flatnonzero(foreground.any(axis=0))
    if ys.size == 0:
        return 0, 0, hw[0], hw[1]
    return int(ys[0]), int(xs[0]), int(ys[-1]) + 1, int(xs[-1]) + 1


def region_box(location: str | dict | PointMM, box: tuple[int, int, int, int], spacing_mm: float,
               extent_mm: float = 0.0) -> tuple[int, int, int, int]:
    """Pixel box (y0, x0, y1, x1) of a named region inside the part box. A point location is a box of side
    ``extent_mm`` + 2 mm centred on the point (the defect's centre goes on the point)."""
    y0, x0, y1, x1 = box
    h, w = y1 - y0, x1 - x0
    if isinstance(location, (dict, PointMM)):
        p = location if isinstance(location, dict) else location.model_dump()
        cy, cx = y0 + p["y_mm"] / spacing_mm, x0 + p["x_mm"] / spacing_mm
        r = (extent_mm / 2 + 1.0) / spacing_mm
        return (max(y0, int(np.floor(cy - r))), max(x0, int(np.floor(cx - r))),
                min(y1, int(np.ceil(cy + r))), min(x1, int(np.ceil(cx + r))))
    hy, hx = y0 + h // 2, x0 + w // 2
    eb_h, eb_w = int(round(EDGE_BAND * h)), int(round(EDGE_BAND * w))
    return {
        "any": (y0, x0, y1, x1),
        "center": (y0 + h // 4, x0 + w // 4, y1 - h // 4, x1 - w // 4),
        "top_left": (y0, x0, hy, hx), "top_right": (y0, hx, hy, x1),
        "bottom_left": (hy, x0, y1, hx), "bottom_right": (hy, hx, y1, x1),
        "top_edge": (y0, x0, y0 + eb_h, x1), "bottom_edge": (y1 - eb_h, x0, y1, x1),
        "left_edge": (y0, x0, y1, x0 + eb_w), "right_edge": (y0, x1 - eb_w, y1, x1),
    }[location]


# ----------------------------------------------------------------------------------------------------------------
# Planner

def plan_frame(spec: SurfaceSpec, rng: np.random.Generator) -> tuple[float, tuple[int, int], dict[str, Any]]:
    fov = round(uniform(rng, spec.field_of_view_mm), 4)
    h, w = spec.hw
    params: dict[str, Any] = {"material": spec.material, "field_of_view_mm": fov, "color": spec.image.color}
    if spec.material == "image":
        photos = list_photos(spec.photos.folder)
        params["photo"] = str(photos[int(rng.integers(len(photos)))])
    return fov / w, (h, w), params


def plan_source(spec: SurfaceSpec, index: int) -> dict[str, Any]:
    """``source:`` photos: this sample's photo (contiguous blocks, so a shard reads one or two) and its id."""
    if spec.source is None:
        return {}
    from schemas.source import file_sha256, unit_for_sample

    photos = list_photos(spec.photos.folder)
    photo = photos[unit_for_sample(index, spec.samples, len(photos))]
    return {"photo": str(photo), "group": f"src-{_cached_sha(str(photo), file_sha256)[:12]}"}


_SHA_CACHE: dict[tuple[str, float, int], str] = {}


def _cached_sha(path: str, fn) -> str:
    st = Path(path).stat()
    key = (path, st.st_mtime, st.st_size)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = fn(path)
    return _SHA_CACHE[key]


def plan_finding(spec: SurfaceSpec, d: SurfaceDefect, k: int, rng: np.random.Generator) -> dict[str, Any]:
    f: dict[str, Any] = {"kind": d.kind, "mixture_entry": k,
                         "location": d.location if isinstance(d.location, str) else d.location.model_dump()}
    for name in ("length_mm", "width_mm", "diameter_mm", "depth_mm"):
        r = getattr(d, name)
        if r is not None:
            f[name] = round(uniform(rng, r), 4)
    if d.orientation_deg is not None:
        f["orientation_deg"] = round(uniform(rng, d.orientation_deg), 3)
    return f


# ----------------------------------------------------------------------------------------------------------------
# Shorthand hooks: a text naming a defect word is a surface defect (with the material it names, if any).

_DEFECT_WORDS = re.compile(r"\b(scratch|scratches|crack|cracks|dent|dents|pit|pits|stain|stains|hole|holes|particle|"
                           r"particles|contamination|chip|chipped|missing material)\b", re.I)


def claims_text(text: str) -> bool:
    return bool(text) and bool(_DEFECT_WORDS.search(text))


def parse_text(text: str) -> dict[str, Any]:
    from schemas.surface_shorthand import parse_defect_text

    defect, material = parse_defect_text(text)
    return {"finding": defect.model_dump(mode="json"), "material": material}


def one_finding_spec(parsed: dict[str, Any], n: int, seed: int) -> dict[str, Any]:
    finding = {k: v for k, v in parsed["finding"].items() if v is not None}
    return {"material": parsed.get("material") or "brushed_metal", "defects": {"negatives": 0.0, "mixture": [finding]}}


SURFACE = register_domain(Domain(
    name=DOMAIN, spec_model=SurfaceSpec, classes=SURFACE_CLASSES, plan_frame=plan_frame, plan_finding=plan_finding,
    plan_source=plan_source,
    codec="u8", findings_field="defects", parse_finding=parse_text, claims_text=claims_text,
    one_finding_spec=one_finding_spec, layout_module="generators.surface", annotator_module="annotators.surface",
    renderers={"procedural": "generators.surface", "controlnet": "generators.controlnet", "learned": "generators.learned"},
    hooks_module="annotators.surface", controlnet_module="generators.surface",
    evaluation_module="annotators.evaluation_surface",
    description="surface images (procedural materials or photos) with defect masks"))


def parse_defect(text: str) -> SurfaceDefect:
    """Shorthand text -> SurfaceDefect (the material named in the text, if any, is dropped; see
    ``schemas.surface_shorthand.parse_defect_text`` to keep it)."""
    from schemas.surface_shorthand import parse_defect_text

    return parse_defect_text(text)[0]
