"""pairforge annotators: measurements from label maps, control maps and QC checks, dispatched by domain.

Each domain registers ``annotate(image, layout, request, qc_spec) -> Annotation`` from the module its
``schemas.domain.Domain`` description names (``annotator_module``), imported on first use. Measurements always
come from the label map itself, never from the request.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from schemas.domain import get_domain
from schemas.errors import SpecError
from schemas.sample import Layout, SampleRequest


@dataclass
class Annotation:
    measured: list[dict[str, Any]]
    checks: list[dict[str, Any]]  # {"name", "passed", "value", "threshold", "detail"}
    bboxes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)


AnnotateFn = Callable[[np.ndarray, Layout, SampleRequest, Any], Annotation]
_ANNOTATORS: dict[str, AnnotateFn] = {}


def register_annotator(domain: str) -> Callable[[AnnotateFn], AnnotateFn]:
    def deco(fn: AnnotateFn) -> AnnotateFn:
        _ANNOTATORS[domain] = fn
        return fn
    return deco


def annotate(domain: str, image: np.ndarray, layout: Layout, request: SampleRequest, qc: Any) -> Annotation:
    return annotator_for(domain)(image, layout, request, qc)


def annotator_for(domain: str) -> AnnotateFn:
    """The annotate function of ``domain``, importing the module its description names on first use."""
    if domain not in _ANNOTATORS:
        mod = get_domain(domain).annotator_module
        if mod:
            importlib.import_module(mod)
    if domain not in _ANNOTATORS:
        raise SpecError(f"no annotator for domain {domain!r}; its description names module "
                        f"{get_domain(domain).annotator_module!r}, which registers none")
    return _ANNOTATORS[domain]


def bounding_box(ys: np.ndarray, xs: np.ndarray) -> list[int]:
    """[x0, y0, x1, y1]: the half-open pixel box around the given pixel coordinates. The one box definition of
    pairforge (annotators, the pipeline's fallback and the exporters use it)."""
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def box_record(instance: int, ys: np.ndarray, xs: np.ndarray, **extra: Any) -> dict[str, Any]:
    """A sample's ``bboxes`` entry: {"instance", extra fields..., "x0", "y0", "x1", "y1"}."""
    x0, y0, x1, y1 = bounding_box(ys, xs)
    return {"instance": int(instance), **extra, "x0": x0, "y0": y0, "x1": x1, "y1": y1}


def instance_boxes(instance: np.ndarray) -> list[dict[str, Any]]:
    """One box per labelled instance (ids > 0) of an instance map, in id order."""
    out = []
    ids = np.unique(instance)
    for k in ids[ids > 0]:
        ys, xs = np.nonzero(instance == k)
        out.append(box_record(int(k), ys, xs))
    return out


def check(name: str, passed: bool, value: float | None = None, threshold: str = "", detail: str = "") -> dict:
    return {"name": name, "passed": bool(passed), "value": None if value is None else float(value),
            "threshold": threshold, "detail": detail}
