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


def check(name: str, passed: bool, value: float | None = None, threshold: str = "", detail: str = "") -> dict:
    return {"name": name, "passed": bool(passed), "value": None if value is None else float(value),
            "threshold": threshold, "detail": detail}
