"""Chest-CT findings: pulmonary nodules with kind, size in mm, lobe, margin and count."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.units import MmRange

NoduleKind = Literal["solid", "part_solid", "ground_glass"]
Lobe = Literal["RUL", "RML", "RLL", "LUL", "LLL", "any", "right", "left"]
# A lung side: the lobes it holds ("right"/"left" are how a scan without a lobe map is addressed).
SIDE_LOBES: dict[str, tuple[str, ...]] = {"right": ("RUL", "RML", "RLL"), "left": ("LUL", "LLL")}
Margin = Literal["smooth", "lobulated", "spiculated"]

# Largest diameter (mm) a lobe holds on one axial slice of the pairforge phantom with room to spare off the
# pleura and fissures. Larger requests are rejected up front instead of failing placement later.
MAX_DIAMETER_MM: dict[str, float] = {"RUL": 40.0, "RML": 28.0, "RLL": 45.0, "LUL": 40.0, "LLL": 45.0, "any": 45.0,
                                   "right": 45.0, "left": 45.0}
MIN_DIAMETER_MM = 2.0

# Axial levels (0 = apex, 1 = base) at which the phantom shows each lobe with room for a finding. The RUL/RML
# switch follows the horizontal fissure; the lower lobes start below the top of the oblique fissures.
LOBE_LEVELS: dict[str, tuple[float, float]] = {
    "RUL": (0.0, 0.44), "RML": (0.6, 0.95), "RLL": (0.4, 1.0), "LUL": (0.0, 0.85), "LLL": (0.4, 1.0),
    "any": (0.0, 1.0), "right": (0.0, 1.0), "left": (0.0, 1.0),
}


class NoduleFinding(BaseModel):
    """One requested pulmonary nodule (or ``count`` of them on the same slice)."""

    model_config = ConfigDict(extra="forbid")

    kind: NoduleKind = "solid"
    diameter_mm: MmRange("diameter_mm") = Field(description="equivalent diameter in mm: a value or [min, max]")
    location: Lobe = "any"
    count: int = Field(1, ge=1, le=10, description="findings of this kind on the same slice")
    weight: float = Field(1.0, gt=0, description="relative weight in the findings mixture")
    margin: Margin = "smooth"
    juxtapleural: bool = Field(False, description="allow the finding to touch the pleura or a fissure")
    juxtavascular: bool = Field(False, exclude_if=lambda v: not v,  # omitted when off: spec hashes stay as they were
                                description="place the finding against a vessel (real scans, source:)")

    @model_validator(mode="after")
    def _sizes_possible(self) -> "NoduleFinding":
        lo, hi = self.diameter_mm
        if lo <= 0:
            raise ValueError(f"diameter {lo:g} mm is not positive; accepted: {MIN_DIAMETER_MM:g} to "
                             f"{MAX_DIAMETER_MM[self.location]:g} mm for location {self.location}")
        if lo < MIN_DIAMETER_MM:
            raise ValueError(f"diameter {lo:g} mm is below the {MIN_DIAMETER_MM:g} mm that a slice can show as a "
                             f"nodule; accepted: {MIN_DIAMETER_MM:g} to {MAX_DIAMETER_MM[self.location]:g} mm")
        if hi > MAX_DIAMETER_MM[self.location]:
            where = "any lobe" if self.location == "any" else self.location
            raise ValueError(f"diameter {hi:g} mm is larger than {where} can hold on one slice; accepted: up to "
                             f"{MAX_DIAMETER_MM[self.location]:g} mm for {where}")
        return self

    def describe(self) -> str:
        lo, hi = self.diameter_mm
        size = f"{lo:g} mm" if lo == hi else f"{lo:g}-{hi:g} mm"
        kind = {"solid": "solid", "part_solid": "part-solid", "ground_glass": "ground-glass"}[self.kind]
        where = "any lobe" if self.location == "any" else self.location
        n = f"{self.count}x " if self.count > 1 else ""
        return f"{n}{size} {self.margin} {kind} nodule, {where}"

