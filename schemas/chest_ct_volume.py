"""The chest-CT volume domain (``chest_ct_volume``): whole 3D chest CTs with pulmonary nodules at exact size.

Registered through the domain registry like ``chest_ct``. Spec model: ``schemas.volume_spec.ChestCTVolumeSpec``
(``volume.size`` [slices, rows, columns], ``volume.spacing_mm`` [z, row, column], ``volume.z_center``, findings
as in 2D plus ``volume_mm3`` and ``juxtavascular``). One sample is one volume; its image is stored with the
``nifti_hu16`` codec (int16 HU .nii.gz, RAS+ affine) and its label and instance maps as NIfTI too.

Planner hooks: ``plan_frame`` returns the in-plane row spacing and (rows, columns) for the shared planner, and
the full 3D grid in the request's params (``volume_size``, ``spacing_zyx_mm``, ``z_center_level``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from schemas.domain import Domain, register_domain
from schemas.plan import uniform
from schemas.volume import VOLUME_CLASSES
from schemas.volume_spec import ChestCTVolumeSpec, VolumeNoduleFinding

DOMAIN = "chest_ct_volume"
LOBE_IDS = (12, 13, 14, 15, 16)


def plan_frame(spec: ChestCTVolumeSpec, rng: np.random.Generator) -> tuple[float, tuple[int, int], dict[str, Any]]:
    nz, ny, nx = (int(v) for v in spec.volume.size)
    sz, sy, sx = (float(v) for v in spec.volume.spacing_mm)
    zc = round(uniform(rng, spec.volume.z_center), 4)
    return sy, (ny, nx), {"volume_size": [nz, ny, nx], "spacing_zyx_mm": [sz, sy, sx], "z_center_level": zc}


def plan_finding(spec: ChestCTVolumeSpec, f: VolumeNoduleFinding, k: int, rng: np.random.Generator) -> dict[str, Any]:
    return {"kind": f.kind, "diameter_mm": round(uniform(rng, f.diameter_mm), 3), "location": f.location,
            "margin": f.margin, "juxtapleural": f.juxtapleural, "juxtavascular": f.juxtavascular,
            "volume_mm3": f.volume_mm3, "mixture_entry": k}


def parse_text(text: str) -> dict[str, Any]:
    from schemas.shorthand import parse_finding

    return {"finding": parse_finding(text).model_dump(mode="json")}


def one_finding_spec(parsed: dict[str, Any], n: int, seed: int) -> dict[str, Any]:
    return {"volume": {"size": [48, 192, 192], "spacing_mm": [2.5, 1.4, 1.4]},
            "findings": {"negatives": 0.0, "mixture": [parsed["finding"]]}}


CHEST_CT_VOLUME = register_domain(Domain(
    name=DOMAIN, spec_model=ChestCTVolumeSpec, classes=VOLUME_CLASSES, plan_frame=plan_frame,
    plan_finding=plan_finding, codec="nifti_hu16", codec_module="store.nifti", findings_field="findings",
    parse_finding=parse_text, one_finding_spec=one_finding_spec,
    layout_module="generators.volume_pipeline", annotator_module="annotators.ct_volume",
    renderers={"procedural": "generators.volume_pipeline"}, hooks_module="annotators.ct_volume",
    display_window=(-600.0, 1500.0), outline_classes=LOBE_IDS,
    evaluation_module="annotators.evaluation_ct_volume",
    description="whole chest-CT volumes (HU, NIfTI) with 3D pulmonary nodules"))
