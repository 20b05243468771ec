"""pairforge annotators: measurements from label maps, control maps and QC checks, dispatched by domain.

Each domain registers ``annotate(image, layout, request, qc_spec) -> Annotation``. Measurements always come from
the label map itself, never from the request.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

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
_MODULES = {"chest_ct": "annotators.ct", "surface": "annotators.surface"}


def register_annotator(domain: str) -> Callable[[AnnotateFn], AnnotateFn]:
    def deco(fn: AnnotateFn) -> AnnotateFn:
        _ANNOTATORS[domain] = fn
        return fn
    return deco


def annotate(domain: str, image: np.ndarray, layout: Layout, request: SampleRequest, qc: Any) -> Annotation:
    if domain not in _ANNOTATORS and domain in _MODULES:
        importlib.import_module(_MODULES[domain])
    return _ANNOTATORS[domain](image, layout, request, qc)


def check(name: str, passed: bool, value: float | None = None, threshold: str = "", detail: str = "") -> dict:
    return {"name": name, "passed": bool(passed), "value": None if value is None else float(value),
            "threshold": threshold, "detail": detail}
