"""Deterministic per-sample plans: which findings, sizes, spacing and split sample k gets."""
from __future__ import annotations

from typing import Callable

import numpy as np

from schemas.sample import SampleRequest
from schemas.seeding import STREAM_REQUEST, sample_rng
from schemas.source import unit_for_sample
from schemas.spec import BaseSpec, ChestCTSpec, spec_hash

SPLITS = ("train", "val", "test")


def sample_id(index: int) -> str:
    return f"{index:07d}"


def draw_split(spec: BaseSpec, rng: np.random.Generator) -> str:
    u = rng.random()
    fr = [spec.splits.train, spec.splits.val, spec.splits.test]
    acc = 0.0
    for name, f in zip(SPLITS, fr):
        acc += f
        if u < acc:
            return name
    return next(n for n, f in zip(reversed(SPLITS), reversed(fr)) if f > 0)


def uniform(rng: np.random.Generator, r: tuple[float, float]) -> float:
    lo, hi = r
    return float(lo) if lo == hi else float(rng.uniform(lo, hi))


def plan_chest_ct(spec: ChestCTSpec, index: int, rng: np.random.Generator) -> SampleRequest:
    split = draw_split(spec, rng)
    spacing = round(uniform(rng, spec.image.spacing_mm), 4)
    level = uniform(rng, spec.slice_level)
    findings: list[dict] = []
    negative = rng.random() < spec.findings.negatives or not spec.findings.mixture
    if not negative:
        weights = np.array([f.weight for f in spec.findings.mixture], dtype=float)
        k = int(rng.choice(len(weights), p=weights / weights.sum()))
        f = spec.findings.mixture[k]
        for _ in range(f.count):
            findings.append({
                "kind": f.kind, "diameter_mm": round(uniform(rng, f.diameter_mm), 3), "location": f.location,
                "margin": f.margin, "juxtapleural": f.juxtapleural, "mixture_entry": k,
            })
            if f.juxtavascular:
                findings[-1]["juxtavascular"] = True
    params = {"slice_level": round(level, 4), "negative": bool(negative)}
    if spec.source is not None:  # real scans: which one (contiguous blocks), and its id as the sample's group
        u = unit_for_sample(index, spec.samples, len(spec.source.units))
        params = {"negative": bool(negative), "source_unit": u, "group": spec.source.units[u].source_id}
    return SampleRequest(index=index, sample_id=sample_id(index), split=split, domain="chest_ct",
                         spacing_mm=spacing, size=(spec.image.size, spec.image.size), findings=findings,
                         params=params)


# domain -> planner(spec, index, rng). Other domains register here.
PLANNERS: dict[str, Callable[[BaseSpec, int, np.random.Generator], SampleRequest]] = {"chest_ct": plan_chest_ct}


def plan_sample(spec: BaseSpec, index: int, digest: str | None = None) -> SampleRequest:
    digest = digest or spec_hash(spec)
    rng = sample_rng(digest, index, STREAM_REQUEST)
    return PLANNERS[spec.domain](spec, index, rng)


def plan_shards(n_samples: int, shard_size: int) -> list[range]:
    return [range(s, min(s + shard_size, n_samples)) for s in range(0, n_samples, shard_size)]
