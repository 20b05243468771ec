"""Surface-defect findings: the class table, defect kinds, materials, named regions and the defect model.

Imported by both ``schemas.surface`` (the spec and the domain) and ``schemas.surface_shorthand`` (the parser),
so that neither imports the other.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.classes import ClassTable
from schemas.units import MmRange, UnitRange

DOMAIN = "surface"
SURFACE_CLASSES = ClassTable(
    domain=DOMAIN,
    names={0: "good", 1: "scratch", 2: "crack", 3: "dent", 4: "pit", 5: "stain", 6: "hole", 7: "particle",
           8: "missing_material", 255: "outside_part"},
    colors={0: (0, 0, 0), 1: (255, 60, 60), 2: (255, 200, 0), 3: (60, 160, 255), 4: (180, 80, 255),
            5: (160, 110, 40), 6: (0, 230, 230), 7: (80, 255, 80), 8: (255, 120, 200), 255: (40, 40, 40)},
)
OUTSIDE_PART = 255

DefectKind = Literal["scratch", "crack", "dent", "pit", "stain", "hole", "particle", "missing_material"]
DEFECT_KINDS: tuple[str, ...] = ("scratch", "crack", "dent", "pit", "stain", "hole", "particle", "missing_material")
DEFECT_CLASS: dict[str, int] = {k: SURFACE_CLASSES.id(k) for k in DEFECT_KINDS}
LINEAR_KINDS = ("scratch", "crack")  # sized by length (along the skeleton) and mean width
ROUND_KINDS = ("dent", "pit", "stain", "hole", "particle")  # sized by equivalent diameter
EDGE_KINDS = ("missing_material",)  # sized by length along the edge and width (depth into the part)

Material = Literal["brushed_metal", "cast_metal", "painted", "plastic", "wood", "textile", "image"]
MATERIALS: tuple[str, ...] = ("brushed_metal", "cast_metal", "painted", "plastic", "wood", "textile", "image")

QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")
EDGES = ("top_edge", "bottom_edge", "left_edge", "right_edge")
NAMED_REGIONS: tuple[str, ...] = ("any", "center") + QUADRANTS + EDGES
EDGE_BAND = 0.2  # an edge region is the band of 20 % of the part's extent along that side
ACCEPTED_REGIONS = ("any, center, top-left, top-right, bottom-left, bottom-right, top/bottom/left/right edge, "
                    "or coordinates {x_mm, y_mm} from the top-left corner")

# Defaults when a size is not given (mm). Widths are raised to at least 1.5 pixels by the spec.
DEFAULT_WIDTH_MM = {"scratch": (0.1, 0.3), "crack": (0.15, 0.4), "missing_material": (1.0, 3.0)}
DEFAULT_DEPTH_MM = {"scratch": (0.01, 0.05), "crack": (0.05, 0.2), "dent": (0.1, 0.5), "pit": (0.1, 0.4),
                    "hole": (1.0, 1.0), "stain": (0.0, 0.0), "particle": (0.05, 0.2), "missing_material": (1.0, 1.0)}


class PointMM(BaseModel):
    """A location given as the defect centre in mm from the image's (or part's) top-left corner."""

    model_config = ConfigDict(extra="forbid")
    x_mm: float = Field(ge=0)
    y_mm: float = Field(ge=0)


class SurfaceDefect(BaseModel):
    """One requested surface defect (or ``count`` of them in the same image)."""

    model_config = ConfigDict(extra="forbid")
    kind: DefectKind
    length_mm: MmRange("length_mm") | None = Field(None, description="scratch/crack: length along the skeleton; "
                                                   "missing_material: length along the edge")
    width_mm: MmRange("width_mm") | None = Field(None, description="scratch/crack: mean width; missing_material: "
                                                 "depth into the part")
    diameter_mm: MmRange("diameter_mm") | None = Field(None, description="dent/pit/stain/hole/particle: equivalent "
                                                       "diameter sqrt(4 area / pi)")
    depth_mm: MmRange("depth_mm") | None = Field(None, description="depth of the depression, shapes the shading")
    location: str | PointMM = Field("any", description=ACCEPTED_REGIONS)
    orientation_deg: UnitRange("orientation_deg") | None = Field(
        None, description="direction of a scratch/crack in degrees (0 = along the image x axis, counter-clockwise)")
    count: int = Field(1, ge=1, le=20)
    weight: float = Field(1.0, gt=0, description="relative weight in the defect mixture")

    @field_validator("location", mode="before")
    @classmethod
    def _location(cls, v):
        if isinstance(v, str):
            return normalise_region(v)
        return v

    @model_validator(mode="after")
    def _sizes(self) -> "SurfaceDefect":
        k = self.kind
        if k in LINEAR_KINDS + EDGE_KINDS:
            if self.length_mm is None:
                raise ValueError(f"a {k} needs length_mm (e.g. 5 or [2, 10])")
            if self.diameter_mm is not None:
                raise ValueError(f"a {k} is sized by length_mm and width_mm, not diameter_mm")
            # a missing width is filled by SurfaceSpec from DEFAULT_WIDTH_MM, raised to 1.5-3 pixels
        else:
            if self.diameter_mm is None:
                raise ValueError(f"a {k} needs diameter_mm (e.g. 1.5 or [0.5, 1])")
            if self.length_mm is not None or self.width_mm is not None:
                raise ValueError(f"a {k} is sized by diameter_mm, not length_mm/width_mm")
        if self.depth_mm is None:
            self.depth_mm = DEFAULT_DEPTH_MM[k]
        for name in ("length_mm", "width_mm", "diameter_mm"):
            r = getattr(self, name)
            if r is not None and r[0] <= 0:
                raise ValueError(f"{name} {r[0]:g} is not positive; sizes are positive lengths in mm")
        if self.depth_mm[0] < 0:
            raise ValueError(f"depth_mm {self.depth_mm[0]:g} is negative")
        if k in LINEAR_KINDS and self.width_mm is not None and self.width_mm[1] > 0.5 * self.length_mm[0]:
            raise ValueError(f"a {k} of width up to {self.width_mm[1]:g} mm and length from {self.length_mm[0]:g} mm "
                             "is not a line; accepted: width at most half the length")
        if isinstance(self.location, PointMM) and self.count > 1:
            raise ValueError(f"{self.count} defects cannot share the point ({self.location.x_mm:g}, "
                             f"{self.location.y_mm:g}) mm; accepted: count 1 at a point, or a region name")
        if k in EDGE_KINDS and isinstance(self.location, str) and self.location not in EDGES + ("any",):
            raise ValueError(f"missing_material (a chipped edge) sits on an edge, not {self.location!r}; accepted: "
                             "top edge, bottom edge, left edge, right edge, any")
        return self

    def extent_mm(self) -> float:
        """Largest extent of the defect (mm), for fit checks."""
        if self.kind in LINEAR_KINDS + EDGE_KINDS:
            return float(self.length_mm[1])
        return float(self.diameter_mm[1])

    def describe(self) -> str:
        def r(v):
            return f"{v[0]:g} mm" if v[0] == v[1] else f"{v[0]:g}-{v[1]:g} mm"
        if self.length_mm:
            size = r(self.length_mm) + (f" x {r(self.width_mm)}" if self.width_mm else "")
        else:
            size = r(self.diameter_mm)
        loc = (self.location if isinstance(self.location, str)
               else f"({self.location.x_mm:g}, {self.location.y_mm:g}) mm")
        n = f"{self.count}x " if self.count > 1 else ""
        return f"{n}{size} {self.kind}, {loc}"


def normalise_region(text: str) -> str:
    t = re.sub(r"[\s_-]+", " ", str(text).strip().lower())
    t = t.replace("upper", "top").replace("lower", "bottom").replace("centre", "center").replace("middle", "center")
    t = re.sub(r"\b(anywhere|any location)\b", "any", t)
    for name in NAMED_REGIONS:
        if t == name.replace("_", " "):
            return name
    m = re.fullmatch(r"(top|bottom|left|right)( edge)?", t)
    if m and m.group(2):
        return f"{m.group(1)}_edge"
    raise ValueError(f"location {text!r} is not known; accepted: {ACCEPTED_REGIONS}")
