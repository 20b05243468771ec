"""A third domain defined entirely here, to show that a domain is one module plus one registration.

``toy_thermal``: thermal-camera frames in degrees Celsius (float images) with circular hot spots. It has its own
spec model with a shorthand phrase ("hot spot 6 mm +12 C"), a layout, a procedural renderer, a float codec
(``float16`` with scale 0.01 °C and offset -50 °C: 16-bit PNG), and an annotator that measures each spot's
equivalent diameter and peak temperature excess from the label map and the image.

Use it in a test with ``import tests.toy_domain as toy; toy.register()``; in a CLI subprocess with
``PAIRFORGE_PLUGINS=tests.toy_domain`` (the repo root on PYTHONPATH).
"""
from __future__ import annotations

import re
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from annotators import Annotation, check, register_annotator
from generators.base import Renderer, register_layout, register_renderer
from schemas.classes import ClassTable
from schemas.domain import Domain, register_domain
from schemas.errors import PlacementError, SpecError
from schemas.plan import uniform
from schemas.sample import Layout, SampleRequest
from schemas.spec import BaseSpec, ImageSpec
from schemas.units import MmRange, UnitRange
from schemas.wording import expand_mixture

NAME = "toy_thermal"
MODULE = __name__
BACKGROUND_C = 20.0
CLASSES = ClassTable(domain=NAME, names={0: "background", 1: "hot_spot"},
                     colors={0: (0, 0, 0), 1: (255, 80, 0)})

_PHRASE = re.compile(r"^\s*hot\s*spot\s+(\d+(?:\.\d+)?)\s*mm(?:\s*\+\s*(\d+(?:\.\d+)?)\s*c)?\s*$", re.I)


def parse_hot_spot(text: str) -> dict[str, Any]:
    """'hot spot 6 mm +12 C' -> {"kind": "hot_spot", "diameter_mm": 6, "excess_c": 12}; SpecError otherwise."""
    m = _PHRASE.match(str(text or ""))
    if not m:
        raise SpecError(f"cannot read {text!r}; accepted: 'hot spot D mm [+T C]', e.g. 'hot spot 6 mm +12 C'")
    out: dict[str, Any] = {"kind": "hot_spot", "diameter_mm": float(m.group(1))}
    if m.group(2):
        out["excess_c"] = float(m.group(2))
    return out


class HotSpot(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["hot_spot"] = "hot_spot"
    diameter_mm: MmRange("diameter_mm")
    excess_c: UnitRange("excess_c") = Field((8.0, 15.0), description="peak temperature above the background, °C")
    count: int = Field(1, ge=1, le=5)
    weight: float = Field(1.0, gt=0)


class HotSpots(BaseModel):
    model_config = ConfigDict(extra="forbid")
    negatives: float = Field(0.2, ge=0, le=1)
    mixture: list[HotSpot] = Field(default_factory=list)

    @field_validator("mixture", mode="before")
    @classmethod
    def _shorthand(cls, v):
        return expand_mixture(v, parse_hot_spot, "findings.mixture", "hot spots")


class ThermalSpec(BaseSpec):
    domain: Literal["toy_thermal"] = NAME
    image: ImageSpec = Field(default_factory=lambda: ImageSpec(size=64, spacing_mm=(1.0, 1.0)))
    findings: HotSpots = Field(default_factory=HotSpots)


def plan_frame(spec: ThermalSpec, rng: np.random.Generator):
    spacing = round(uniform(rng, spec.image.spacing_mm), 4)
    return spacing, (spec.image.size, spec.image.size), {"ambient_c": round(float(rng.uniform(18, 22)), 3)}


def plan_finding(spec: ThermalSpec, entry: HotSpot, k: int, rng: np.random.Generator) -> dict[str, Any]:
    return {"kind": "hot_spot", "diameter_mm": round(uniform(rng, entry.diameter_mm), 3),
            "excess_c": round(uniform(rng, entry.excess_c), 3), "mixture_entry": k}


def parse_text(text: str) -> dict[str, Any]:
    return {"finding": parse_hot_spot(text)}


def one_finding_spec(parsed: dict, n: int, seed: int) -> dict[str, Any]:
    return {"image": {"size": 64, "spacing_mm": 1.0}, "findings": {"negatives": 0.0, "mixture": [parsed["finding"]]}}


# ---------------------------------------------------------------- generators layer: layout and renderer
@register_layout(NAME)
def thermal_layout(spec: ThermalSpec, request: SampleRequest, rng: np.random.Generator) -> Layout:
    h, w = request.size
    label = np.zeros((h, w), np.uint8)
    instance = np.zeros((h, w), np.uint16)
    placed = []
    yy, xx = np.mgrid[0:h, 0:w]
    for i, f in enumerate(request.findings, start=1):
        r = f["diameter_mm"] / 2 / request.spacing_mm
        for _ in range(50):
            cy, cx = rng.uniform(r + 1, h - r - 1), rng.uniform(r + 1, w - r - 1)
            disc = (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r * r
            if not (instance[disc] > 0).any():
                break
        else:
            raise PlacementError(f"no room for hot spot {i}")
        label[disc] = 1
        instance[disc] = i
        placed.append(dict(f, instance=i, center_px=[round(float(cy), 2), round(float(cx), 2)]))
    return Layout(label=label, instance=instance, spacing_mm=request.spacing_mm, findings=placed,
                  params=dict(request.params))


@register_renderer
class ThermalRenderer(Renderer):
    name = "procedural"
    version = "toy-1"
    domains = (NAME,)

    def render(self, layout: Layout, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        ambient = float(layout.params.get("ambient_c", BACKGROUND_C))
        img = ambient + rng.normal(0, 0.2, layout.label.shape)
        for f in layout.findings:
            m = layout.instance == f["instance"]
            img[m] += f["excess_c"]
        return img.astype(np.float32), {"noise_c": 0.2}


# ---------------------------------------------------------------- annotators layer: a measurement and QC
@register_annotator(NAME)
def annotate_thermal(image: np.ndarray, layout: Layout, request: SampleRequest, qc: Any) -> Annotation:
    sp = layout.spacing_mm
    measured, checks = [], []
    background = float(np.median(image[layout.instance == 0])) if (layout.instance == 0).any() else 0.0
    for f in layout.findings:
        m = layout.instance == f["instance"]
        d = float(np.sqrt(4 * m.sum() / np.pi)) * sp
        excess = float(image[m].max() - background)
        measured.append({"instance": f["instance"], "kind": "hot_spot", "equivalent_diameter_mm": round(d, 3),
                         "excess_c": round(excess, 3)})
        tol = max(qc.size_tolerance_mm, sp)
        checks.append(check(f"size_{f['instance']}", abs(d - f["diameter_mm"]) <= tol, d - f["diameter_mm"],
                            f"|error| <= {tol:g} mm"))
    if not layout.findings:
        checks.append(check("negative_empty", not layout.label.any()))
    return Annotation(measured=measured, checks=checks)


def preview_overlay(image: np.ndarray, label: np.ndarray, instance: np.ndarray, table: Any) -> np.ndarray:
    """Hook for `pairforge preview`: an iron-like colour map of the temperatures, spots outlined in white."""
    from annotators.overlay import display, instance_outline

    view = cv2.applyColorMap(display(image, DOMAIN.display_window), cv2.COLORMAP_INFERNO)[:, :, ::-1]
    return instance_outline(np.ascontiguousarray(view), instance, color=(255, 255, 255))


DOMAIN = Domain(
    name=NAME, spec_model=ThermalSpec, classes=CLASSES, plan_frame=plan_frame, plan_finding=plan_finding,
    codec="float16", codec_params={"scale": 0.01, "offset": -50.0}, parse_finding=parse_text,
    claims_text=lambda t: bool(re.search(r"\bhot\s*spot\b", t, re.I)), one_finding_spec=one_finding_spec,
    layout_module=MODULE, annotator_module=MODULE, renderers={"procedural": MODULE}, hooks_module=MODULE,
    evaluation_module=MODULE,
    display_window=(30.0, 30.0), description="toy thermal frames (°C) with hot spots")


def register() -> Domain:
    """Register the toy domain (idempotent). Its layer parts registered themselves when this module was imported."""
    return register_domain(DOMAIN)


register()


# ---------------------------------------------------------------- evaluation profile (``pairforge evaluate``)
from annotators.evaluation import EvalProfile, register_profile  # noqa: E402

EVAL_PROFILE = register_profile(EvalProfile(
    domain=NAME, units="°C", seg_groups={"hot_spot": (1,)}, finding_group="hot_spot", finding_ids=(1,),
    surround_ids=(0,), reference_ranges={"background": ((0,), 15.0, 25.0), "hot_spot": ((1,), 24.0, 45.0)},
    histogram_classes={"background": (0,), "hot_spot": (1,)},
    threshold_classes={"background": (10.0, 24.9), "hot_spot": (25.0, 60.0)}, uniform_ids=(0,),
    uniform_interval=(10.0, 24.9), value_range=(0, 100), windows=((30.0, 30.0),), display_window=(30.0, 30.0),
    small_finding_mm=3.0))
