"""Deterministic per-sample plans: which findings, sizes, spacing and split sample k gets."""
from __future__ import annotations

from typing import Callable

import numpy as np

from schemas.sample import SampleRequest
from schemas.seeding import STREAM_REQUEST, sample_rng
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
    return SampleRequest(index=index, sample_id=sample_id(index), split=split, domain="chest_ct",
                         spacing_mm=spacing, size=(spec.image.size, spec.image.size), findings=findings,
                         params={"slice_level": round(level, 4), "negative": bool(negative)})


# domain -> planner(spec, index, rng). Other domains register here.
PLANNERS: dict[str, Callable[[BaseSpec, int, np.random.Generator], SampleRequest]] = {"chest_ct": plan_chest_ct}


def plan_sample(spec: BaseSpec, index: int, digest: str | None = None) -> SampleRequest:
    digest = digest or spec_hash(spec)
    rng = sample_rng(digest, index, STREAM_REQUEST)
    request = PLANNERS[spec.domain](spec, index, rng)
    # The split comes from the whole plan (exact counts, stratified, grouped); the planners still draw their own,
    # unused, so that every other value of the request stream (and every image) stays what it was.
    request.split = split_table(spec, digest)[index]
    return request


_SPLIT_TABLES: dict[tuple[str, int], list[str]] = {}


def split_table(spec: BaseSpec, digest: str | None = None) -> list[str]:
    """The split of every sample of ``spec`` (see schemas.splits.assign_splits): strata are the (kind, location, size
    band) of each sample's largest planned finding; a request's ``params["group"]`` (e.g. its source scan) keeps
    samples together. Planned once per process and spec."""
    from schemas.splits import assign_splits, finding_stratum

    digest = digest or spec_hash(spec)
    key = (digest, int(spec.samples))
    table = _SPLIT_TABLES.get(key)
    if table is None:
        planner = PLANNERS[spec.domain]
        requests = [planner(spec, i, sample_rng(digest, i, STREAM_REQUEST)) for i in range(spec.samples)]
        fractions = {name: float(getattr(spec.splits, name)) for name in SPLITS}
        table = assign_splits(list(range(spec.samples)), fractions,
                              strata=[finding_stratum(r.findings) for r in requests],
                              groups=[r.params.get("group") for r in requests], seed=digest)
        if len(_SPLIT_TABLES) >= 8:
            _SPLIT_TABLES.clear()
        _SPLIT_TABLES[key] = table
    return table


def plan_shards(n_samples: int, shard_size: int) -> list[range]:
    return [range(s, min(s + shard_size, n_samples)) for s in range(0, n_samples, shard_size)]
