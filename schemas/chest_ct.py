"""The chest-CT domain: axial slices with pulmonary nodules. Its class table, spec model, planner hooks and
shorthand, registered as the ``chest_ct`` Domain (the default domain of a spec that names none).

The layout lives in ``generators/chest_ct.py``, the renderer in ``generators/ct_render.py``, measurements and QC
in ``annotators/ct.py``; this module names them for the registry.
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.classes import ClassTable
from schemas.domain import Domain, register_domain
from schemas.findings import LOBE_LEVELS, MAX_DIAMETER_MM, NoduleFinding
from schemas.plan import uniform
from schemas.source import CTSource, unit_for_sample
from schemas.spec import BaseSpec, ImageSpec
from schemas.units import UnitRange
from schemas.wording import expand_mixture

DOMAIN = "chest_ct"

# Chest CT, axial slice. Lobes follow the anatomical five-lobe model (the lingula belongs to LUL).
CT_CLASSES = ClassTable(
    domain=DOMAIN,
    names={
        0: "air_outside",
        1: "table",
        2: "skin",
        3: "subcutaneous_fat",
        4: "muscle",
        5: "cortical_bone",
        6: "cancellous_bone",
        7: "mediastinal_fat",
        8: "heart",
        9: "great_vessel",
        10: "trachea_bronchus",
        11: "esophagus",
        12: "lung_rul",
        13: "lung_rml",
        14: "lung_rll",
        15: "lung_lul",
        16: "lung_lll",
        17: "pulmonary_vessel",
        18: "airway_lumen",
        19: "airway_wall",
        20: "nodule_solid",
        21: "nodule_ground_glass",
        22: "liver",
        23: "spinal_canal",
        24: "upper_abdomen",
        # Real scans (source:): a lung known only by its side, and body tissue the user's labels leave unnamed.
        25: "lung_right",
        26: "lung_left",
        27: "tissue_unlabelled",
    },
    colors={
        0: (0, 0, 0), 1: (90, 90, 90), 2: (255, 200, 160), 3: (240, 220, 120), 4: (200, 80, 80),
        5: (255, 255, 255), 6: (220, 220, 180), 7: (250, 240, 160), 8: (220, 40, 60), 9: (255, 90, 40),
        10: (60, 200, 255), 11: (180, 120, 90), 12: (70, 130, 255), 13: (60, 220, 140), 14: (150, 90, 255),
        15: (255, 170, 60), 16: (255, 90, 200), 17: (200, 30, 30), 18: (120, 230, 255), 19: (0, 150, 200),
        20: (255, 255, 0), 21: (0, 255, 255), 22: (150, 70, 40), 23: (120, 120, 255), 24: (170, 110, 80),
        25: (80, 140, 230), 26: (240, 150, 80), 27: (110, 110, 110),
    },
)

CT_IDS: dict[str, int] = {name: k for k, name in CT_CLASSES.names.items()}  # class name -> label id

LOBES: dict[str, int] = {"RUL": 12, "RML": 13, "RLL": 14, "LUL": 15, "LLL": 16}
LOBE_NAMES: dict[str, str] = {
    "RUL": "right upper lobe", "RML": "right middle lobe", "RLL": "right lower lobe",
    "LUL": "left upper lobe (lingula included)", "LLL": "left lower lobe",
}
LUNG_CLASS_IDS = frozenset(LOBES.values()) | {17, 18, 19, 20, 21, 25, 26}
NODULE_CLASS_IDS = frozenset({20, 21})



class CTFindings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    negatives: float = Field(0.2, ge=0, le=1, description="share of samples with no finding")
    mixture: list[NoduleFinding] = Field(default_factory=list)

    @field_validator("mixture", mode="before")
    @classmethod
    def _shorthand(cls, v):
        from schemas.shorthand import parse_finding

        return expand_mixture(v, lambda text: parse_finding(text).model_dump(), "findings.mixture", "findings")

    @model_validator(mode="after")
    def _mixture_needed(self) -> "CTFindings":
        if self.negatives < 1 and not self.mixture:
            raise ValueError("findings.mixture is empty but findings.negatives < 1; add findings or set negatives: 1")
        return self


class ChestCTSpec(BaseSpec):
    """An axial chest-CT slice dataset with pulmonary nodules."""

    domain: Literal["chest_ct"] = DOMAIN
    image: ImageSpec = Field(default_factory=ImageSpec)
    slice_level: UnitRange("slice_level") = Field(
        (0.15, 0.95), description="axial level, 0 = lung apex, 1 = lung base: value or [min, max]")
    findings: CTFindings = Field(default_factory=CTFindings)
    source: CTSource | None = Field(None, exclude_if=lambda v: v is None, description="the user's CT scans to insert findings into (instead of the "
                                                      "phantom); see docs/insertion.md")

    @field_validator("slice_level")
    @classmethod
    def _level(cls, v):
        if v[0] < 0 or v[1] > 1:
            raise ValueError(f"slice_level {v[0]:g}-{v[1]:g} is outside 0 (apex) to 1 (base)")
        return v

    @model_validator(mode="after")
    def _fits(self) -> "ChestCTSpec":
        if self.source is not None:  # real scans: their own geometry; locations must be ones the source can honour
            for i, f in enumerate(self.findings.mixture):
                if not self.source.allows(f.location):
                    raise ValueError(
                        f"findings.mixture[{i}]: location {f.location} needs lobes, and source {self.source.path!r} "
                        "has no lobe map; accepted: right, left or any, or source.lobes: approximate (a geometric "
                        "rule, recorded as approximate), or lobe classes in source.mask_classes with lobes: masks")
            return self
        for i, f in enumerate(self.findings.mixture):
            if f.juxtavascular:
                raise ValueError(f"findings.mixture[{i}]: juxtavascular placement is for real scans (source:); the "
                                 "phantom places nodules off vessels")
        # A finding must fit in a lung at the smallest field of view the spec allows.
        fov_mm = self.image.size * self.image.spacing_mm[0]
        limit = 0.18 * fov_mm
        for i, f in enumerate(self.findings.mixture):
            if f.diameter_mm[1] > limit:
                raise ValueError(
                    f"findings.mixture[{i}]: diameter {f.diameter_mm[1]:g} mm is larger than a lung can hold in a "
                    f"{fov_mm:g} mm field of view ({self.image.size} px at {self.image.spacing_mm[0]:g} mm); accepted: "
                    f"up to {min(limit, MAX_DIAMETER_MM[f.location]):.1f} mm, or raise image.size or image.spacing_mm")
            lo, hi = LOBE_LEVELS[f.location]
            if min(hi, self.slice_level[1]) < max(lo, self.slice_level[0]):
                raise ValueError(
                    f"findings.mixture[{i}]: {f.location} does not appear on slices at slice_level "
                    f"{self.slice_level[0]:g}-{self.slice_level[1]:g}; {f.location} is seen at levels {lo:g}-{hi:g}")
            if f.diameter_mm[0] < 2 * self.image.spacing_mm[1]:
                raise ValueError(
                    f"findings.mixture[{i}]: diameter {f.diameter_mm[0]:g} mm is under 2 pixels at "
                    f"{self.image.spacing_mm[1]:g} mm spacing; accepted: at least {2 * self.image.spacing_mm[1]:g} mm")
        return self


assert set(MAX_DIAMETER_MM) - {"any", "right", "left"} == set(LOBES)


# ----------------------------------------------------------------------------------------------------------------
# Planner hooks (the shared planner in schemas.plan draws split, negatives and the mixture entry)

def plan_frame(spec: ChestCTSpec, rng: np.random.Generator) -> tuple[float, tuple[int, int], dict[str, Any]]:
    spacing = round(uniform(rng, spec.image.spacing_mm), 4)
    level = uniform(rng, spec.slice_level)
    return spacing, (spec.image.size, spec.image.size), {"slice_level": round(level, 4)}


def plan_finding(spec: ChestCTSpec, f: NoduleFinding, k: int, rng: np.random.Generator) -> dict[str, Any]:
    out = {"kind": f.kind, "diameter_mm": round(uniform(rng, f.diameter_mm), 3), "location": f.location,
           "margin": f.margin, "juxtapleural": f.juxtapleural, "mixture_entry": k}
    if f.juxtavascular:
        out["juxtavascular"] = True
    return out


def plan_source(spec: ChestCTSpec, index: int) -> dict[str, Any]:
    """Real scans: which source this sample starts from (contiguous blocks) and its id as the sample's group."""
    if spec.source is None:
        return {}
    u = unit_for_sample(index, spec.samples, len(spec.source.units))
    return {"source_unit": u, "group": spec.source.units[u].source_id}


# ----------------------------------------------------------------------------------------------------------------
# Shorthand hooks

def parse_text(text: str) -> dict[str, Any]:
    from schemas.shorthand import parse_finding

    return {"finding": parse_finding(text).model_dump(mode="json")}


def one_finding_spec(parsed: dict[str, Any], n: int, seed: int) -> dict[str, Any]:
    return {"findings": {"negatives": 0.0, "mixture": [parsed["finding"]]}}


CHEST_CT = register_domain(Domain(
    name=DOMAIN, spec_model=ChestCTSpec, classes=CT_CLASSES, plan_frame=plan_frame, plan_finding=plan_finding,
    plan_source=plan_source,
    codec="hu16", findings_field="findings", parse_finding=parse_text, one_finding_spec=one_finding_spec,
    layout_module="generators.ct_insert", annotator_module="annotators.ct_insertion",
    renderers={"procedural": "generators.ct_insert", "controlnet": "generators.controlnet",
               "learned": "generators.learned"},
    hooks_module="annotators.ct", display_window=(-600.0, 1500.0), outline_classes=tuple(sorted(LOBES.values())),
    controlnet_module="generators.chest_ct", default=True,
    evaluation_module="annotators.evaluation_ct",
    reference_sets={"standin": "generators.standin:standin_samples",
                    "ct_small_inserted": "flows.reference_chest_ct:ct_small_inserted_samples"},
    description="axial chest-CT slices (HU) with pulmonary nodules"))
