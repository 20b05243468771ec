"""The one in-memory sample record that flows generators -> annotators -> store (MONAI-style: steps add fields)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class SampleRequest:
    """What one sample must contain, drawn deterministically from the spec (never changes across retries)."""

    index: int
    sample_id: str
    split: str
    domain: str
    spacing_mm: float
    size: tuple[int, int]  # (height, width) in pixels
    findings: list[dict[str, Any]]  # concrete requested findings (sizes drawn, one entry per finding)
    params: dict[str, Any] = field(default_factory=dict)  # other drawn request parameters (e.g. slice level)


@dataclass
class Layout:
    """A generator's layout: label maps at physical size plus everything drawn to make them."""

    label: np.ndarray  # uint8 semantic class ids, HxW
    instance: np.ndarray  # uint16 finding ids (0 = none, k = request.findings[k-1]), HxW
    spacing_mm: float
    findings: list[dict[str, Any]]  # placed findings: the request plus placement (centre, region, ...)
    params: dict[str, Any]
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. a height map for surface shading


@dataclass
class Sample:
    """One finished sample. ``image`` is float32 HU for CT, uint8 (HxW or HxWx3) for surface data."""

    sample_id: str
    index: int
    split: str
    domain: str
    spacing_mm: float
    image: np.ndarray
    label: np.ndarray
    instance: np.ndarray
    requested: list[dict[str, Any]]
    measured: list[dict[str, Any]]
    params: dict[str, Any]  # {"request": ..., "layout": ..., "render": ...}: every drawn parameter
    qc: dict[str, Any]  # {"passed": bool, "attempts": n, "checks": [...], "history": [...]}
    seed: dict[str, Any]  # {"spec_hash", "index", "attempt"}: enough to rebuild the sample alone
    generator: dict[str, str]  # {"name", "version"}
    bboxes: list[dict[str, Any]] = field(default_factory=list)
    group: str | None = None  # samples from one real source share a group (e.g. its source id): keep it in one split

    @property
    def height(self) -> int:
        return int(self.label.shape[0])

    @property
    def width(self) -> int:
        return int(self.label.shape[1])
