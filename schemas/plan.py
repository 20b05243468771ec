"""Deterministic per-sample plans: which findings, sizes, spacing and split sample k gets.

One planner for every domain: it draws the split, the domain's frame (``Domain.plan_frame``: spacing, level,
material...), whether the sample is a negative, which mixture entry (by weight) and ``count`` concrete findings
(``Domain.plan_finding``). The order of draws is fixed, so a plan is a pure function of (spec hash, index).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from schemas.domain import all_domains, get_domain
from schemas.sample import SampleRequest
from schemas.seeding import STREAM_REQUEST, sample_rng
from schemas.spec import BaseSpec, spec_hash

SPLITS = ("train", "val", "test")


def sample_id(index: int) -> str:
    return f"{index:07d}"


def draw_split(spec: BaseSpec, rng: np.random.Generator) -> str:
    """A per-sample split draw. Its value is no longer used (``split_table`` assigns splits over the whole plan:
    exact counts, stratified, grouped); the draw stays so that the request stream after it is unchanged."""
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


def draw_mixture(spec: BaseSpec, field: str, rng: np.random.Generator) -> tuple[bool, int | None, Any]:
    """(negative, entry index, entry) from ``spec.<field>`` (``negatives`` share, ``mixture`` weighted by
    ``weight``). A spec with an empty mixture only has negatives."""
    block = getattr(spec, field)
    negative = bool(rng.random() < block.negatives or not block.mixture)
    if negative:
        return True, None, None
    weights = np.array([f.weight for f in block.mixture], dtype=float)
    k = int(rng.choice(len(weights), p=weights / weights.sum()))
    return False, k, block.mixture[k]


def plan_with(domain: Any, spec: BaseSpec, index: int, rng: np.random.Generator) -> SampleRequest:
    """The shared planner, with the hooks of ``domain`` (a ``schemas.domain.Domain``)."""
    split = draw_split(spec, rng)
    spacing, size, params = domain.plan_frame(spec, rng)
    negative, k, entry = draw_mixture(spec, domain.findings_field, rng)
    findings: list[dict] = []
    if not negative:
        for _ in range(entry.count):
            findings.append(domain.plan_finding(spec, entry, k, rng))
    params = dict(params, negative=negative)
    if domain.plan_source is not None:
        params.update(domain.plan_source(spec, index))
    return SampleRequest(index=index, sample_id=sample_id(index), split=split, domain=domain.name,
                         spacing_mm=spacing, size=(int(size[0]), int(size[1])), findings=findings, params=params)


def plan_sample(spec: BaseSpec, index: int, digest: str | None = None) -> SampleRequest:
    digest = digest or spec_hash(spec)
    rng = sample_rng(digest, index, STREAM_REQUEST)
    request = plan_with(get_domain(spec.domain), spec, index, rng)
    # The split comes from the whole plan (exact counts, stratified, grouped); ``plan_with`` still draws its own,
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
        domain = get_domain(spec.domain)
        requests = [plan_with(domain, spec, i, sample_rng(digest, i, STREAM_REQUEST)) for i in range(spec.samples)]
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


def __getattr__(name: str):
    """``PLANNERS`` (domain -> planner) and the old per-domain planner names, from the registry."""
    if name.startswith("__"):
        raise AttributeError(name)
    if name == "PLANNERS":
        return {d.name: (lambda spec, index, rng, _d=d: plan_with(_d, spec, index, rng)) for d in all_domains()}
    if name.startswith("plan_") and name[len("plan_"):] in {d.name for d in all_domains()}:
        d = get_domain(name[len("plan_"):])
        return lambda spec, index, rng: plan_with(d, spec, index, rng)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
