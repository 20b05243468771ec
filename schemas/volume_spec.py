"""Spec model of chest-CT volume datasets (domain ``chest_ct_volume``) and its per-volume planner.

Standalone until the domain registry takes it: ``validate_volume_spec`` turns any validation failure into one
readable SpecError line; ``plan_volume`` draws volume k's request from its own request stream.
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.errors import SpecError
from schemas.findings import NoduleFinding
from schemas.seeding import STREAM_REQUEST, sample_rng
from schemas.spec import BaseSpec, spec_hash
from schemas.units import UnitRange


class VolumeNoduleFinding(NoduleFinding):
    """A 3D nodule: as in 2D, plus an optional exact volume and juxtavascular contact."""

    volume_mm3: float | None = Field(None, gt=0, description="exact volume in mm3 (overrides the diameter's)")
    juxtavascular: bool = Field(False, description="place the nodule touching a pulmonary vessel")


class VolumeGrid(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: tuple[int, int, int] = Field((128, 512, 512), description="voxels (slices, rows, columns)")
    spacing_mm: tuple[float, float, float] = Field((2.5, 0.7, 0.7), description="mm (z, row, column)")
    z_center: UnitRange("volume.z_center") = Field((0.5, 0.5), description="coverage centre: 0 apex, 1 base")

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        if not (8 <= v[0] <= 1024 and 32 <= v[1] <= 1024 and 32 <= v[2] <= 1024):
            raise ValueError(f"volume size {list(v)} is outside 8-1024 slices and 32-1024 rows/columns")
        return v

    @field_validator("spacing_mm")
    @classmethod
    def _spacing(cls, v):
        if not (0.2 <= v[0] <= 10 and 0.2 <= v[1] <= 5 and 0.2 <= v[2] <= 5):
            raise ValueError(f"spacing {list(v)} mm is outside 0.2-10 mm (z) and 0.2-5 mm (in-plane)")
        return v


class VolumeFindings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    negatives: float = Field(0.2, ge=0, le=1)
    mixture: list[VolumeNoduleFinding] = Field(default_factory=list)

    @field_validator("mixture", mode="before")
    @classmethod
    def _shorthand(cls, v):
        from schemas.shorthand import parse_finding
        from schemas.wording import expand_mixture

        return expand_mixture(v, lambda text: parse_finding(text).model_dump(), "findings.mixture", "findings")

    @model_validator(mode="after")
    def _mixture_needed(self):
        if self.negatives < 1 and not self.mixture:
            raise ValueError("findings.mixture is empty but findings.negatives < 1; add findings or set negatives: 1")
        return self


# Memory of volume generation, measured with tracemalloc on the procedural generator (docs/robustness.md): one
# volume peaks at 16-22 bytes per voxel while it is made (HU float32, label, instance, lobe map, temporaries), and
# each finished volume a shard keeps until it is written holds ~11 bytes per voxel.
WORK_BYTES_PER_VOXEL = 20
KEPT_BYTES_PER_VOXEL = 11


class ChestCTVolumeSpec(BaseSpec):
    domain: Literal["chest_ct_volume"] = "chest_ct_volume"
    volume: VolumeGrid = Field(default_factory=VolumeGrid)
    findings: VolumeFindings = Field(default_factory=VolumeFindings)

    def peak_memory(self, at_once: int) -> tuple[int, str]:
        """(bytes, description) one worker needs to make ``at_once`` volumes (a shard) before writing them."""
        z, y, x = self.volume.size
        voxels = z * y * x
        need = voxels * (WORK_BYTES_PER_VOXEL + (max(1, at_once) - 1) * KEPT_BYTES_PER_VOXEL)
        return need, f"{z} x {y} x {x} voxels per volume"


def validate_volume_spec(data: dict[str, Any]) -> ChestCTVolumeSpec:
    try:
        return ChestCTVolumeSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        raise SpecError(f"{where}: {err['msg']}") from None


def plan_volume(spec: ChestCTVolumeSpec, index: int, digest: str | None = None) -> dict[str, Any]:
    """Volume ``index``'s request: grid, coverage centre and concrete findings (sizes drawn, counts expanded)."""
    rng = sample_rng(digest or spec_hash(spec), index, STREAM_REQUEST)
    lo, hi = spec.volume.z_center
    zc = float(lo) if lo == hi else float(rng.uniform(lo, hi))
    findings: list[dict[str, Any]] = []
    if spec.findings.mixture and rng.random() >= spec.findings.negatives:
        w = np.array([f.weight for f in spec.findings.mixture], float)
        k = int(rng.choice(len(w), p=w / w.sum()))
        f = spec.findings.mixture[k]
        for _ in range(f.count):
            a, b = f.diameter_mm
            findings.append({"kind": f.kind, "diameter_mm": round(float(a if a == b else rng.uniform(a, b)), 3),
                             "location": f.location, "margin": f.margin, "juxtapleural": f.juxtapleural,
                             "juxtavascular": f.juxtavascular, "volume_mm3": f.volume_mm3, "mixture_entry": k})
    return {"shape": tuple(spec.volume.size), "spacing": tuple(spec.volume.spacing_mm), "z_center_level": round(zc, 4),
            "findings": findings}
