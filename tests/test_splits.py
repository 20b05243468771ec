"""Splits: exact counts from the fractions, balanced inside every stratum, groups never divided, deterministic."""
from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from schemas.splits import assign_splits, controlled_rounding, finding_stratum, largest_remainder


def _expected(n: int, fr: dict[str, float]) -> dict[str, int]:
    """Largest-remainder rounding, written out independently."""
    quotas = {k: v * n / sum(fr.values()) for k, v in fr.items()}
    counts = {k: math.floor(q) for k, q in quotas.items()}
    left = n - sum(counts.values())
    for k in sorted(fr, key=lambda k: (-(quotas[k] - counts[k]), list(fr).index(k)))[:left]:
        counts[k] += 1
    return counts


FRACTIONS = [
    {"train": 0.8, "val": 0.1, "test": 0.1},
    {"train": 0.7, "val": 0.15, "test": 0.15},
    {"train": 0.6, "val": 0.2, "test": 0.2},
    {"train": 1.0, "val": 0.0, "test": 0.0},
    {"train": 0.5, "val": 0.5, "test": 0.0},
    {"train": 0.34, "val": 0.33, "test": 0.33},
]


@pytest.mark.parametrize("fr", FRACTIONS, ids=lambda f: "/".join(f"{v:g}" for v in f.values()))
@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 19, 100, 240, 500, 1001])
def test_split_sizes_are_the_largest_remainder_rounding_of_the_fractions(n, fr):
    rng = np.random.default_rng(n)
    strata = [("solid", "RUL", "4-8"), ("ggn", "LLL", "8-16"), ("negative", "-", "-")]
    labels = [strata[i] for i in rng.integers(0, 3, n)]
    got = Counter(assign_splits(list(range(n)), fr, strata=labels, seed="abc"))
    want = _expected(n, fr)
    assert {k: got.get(k, 0) for k in fr} == want
    if n == 240 and fr["train"] == 0.8:
        assert want == {"train": 192, "val": 24, "test": 24}


def test_every_stratum_gets_its_share_of_each_split_within_one_sample():
    rng = np.random.default_rng(7)
    kinds = ["solid", "part_solid", "ground_glass", "negative"]
    locs = ["RUL", "RML", "RLL", "LUL", "LLL"]
    strata = [(kinds[a], locs[b]) for a, b in zip(rng.integers(0, 4, 500), rng.integers(0, 5, 500))]
    fr = {"train": 0.7, "val": 0.15, "test": 0.15}
    out = assign_splits(list(range(500)), fr, strata=strata, seed="spec-hash")
    sizes = Counter(strata)
    cells = Counter(zip(strata, out))
    worst = 0.0
    for h, size in sizes.items():
        for s, f in fr.items():
            worst = max(worst, abs(cells[(h, s)] - f * size))
    assert worst <= 1.0, worst
    # A naive per-sample draw is far off in small strata; the stratified one is not.
    assert Counter(out) == Counter(_expected(500, fr))


def test_groups_are_never_divided_and_totals_stay_close():
    rng = np.random.default_rng(3)
    groups = [f"scan-{g}" for g in rng.integers(0, 60, 600)]  # 60 scans, ~10 slices each
    strata = [("solid" if g % 2 else "negative",) for g in rng.integers(0, 2, 600)]
    fr = {"train": 0.8, "val": 0.1, "test": 0.1}
    out = assign_splits(list(range(600)), fr, strata=strata, groups=groups, seed="s")
    per_group = {}
    for g, s in zip(groups, out):
        per_group.setdefault(g, set()).add(s)
    assert all(len(v) == 1 for v in per_group.values()), "a scan spans two splits"
    got = Counter(out)
    largest = max(Counter(groups).values())
    for s, f in fr.items():
        assert abs(got[s] - f * 600) <= largest, (got, largest)
    assert got["val"] > 0 and got["test"] > 0


def test_ungrouped_keys_beside_groups_keep_exact_totals_when_groups_fit():
    groups = ["a"] * 8 + ["b"] * 8 + [None] * 84  # 100 samples, two groups of 8
    out = assign_splits(list(range(100)), {"train": 0.8, "val": 0.1, "test": 0.1}, groups=groups, seed="x")
    assert len(set(out[:8])) == 1 and len(set(out[8:16])) == 1
    assert Counter(out) == {"train": 80, "val": 10, "test": 10}


def test_assignment_is_deterministic_and_independent_of_input_order():
    keys = list(range(300))
    strata = [("k", i % 7) for i in keys]
    fr = {"train": 0.8, "val": 0.1, "test": 0.1}
    a = assign_splits(keys, fr, strata=strata, seed="h1")
    assert a == assign_splits(keys, fr, strata=strata, seed="h1")
    perm = np.random.default_rng(0).permutation(300)
    b = assign_splits([keys[i] for i in perm], fr, strata=[strata[i] for i in perm], seed="h1")
    assert {keys[i]: s for i, s in zip(perm, b)} == dict(zip(keys, a))
    assert a != assign_splits(keys, fr, strata=strata, seed="h2")  # the seed varies who goes where


def test_controlled_rounding_keeps_both_margins():
    for rows, cols in [([3, 5, 7], [12, 2, 1]), ([1] * 9, [7, 1, 1]), ([0, 4], [2, 2, 0])]:
        t = controlled_rounding(rows, cols)
        assert [sum(r) for r in t] == rows and [sum(c) for c in zip(*t)] == cols
        total = sum(rows)
        for h, s in itertools.product(range(len(rows)), range(len(cols))):
            assert abs(t[h][s] - rows[h] * cols[s] / total) <= 1


def test_largest_remainder_matches_the_textbook_case():
    assert largest_remainder([0.8, 0.1, 0.1], 240) == [192, 24, 24]
    assert largest_remainder([0.7, 0.1, 0.2], 500) == [350, 50, 100]
    assert largest_remainder([1 / 3] * 3, 10) == [4, 3, 3]


def test_finding_stratum_reads_kind_location_and_size_band_of_the_largest_finding():
    assert finding_stratum([]) == ("negative", "-", "-")
    f = [{"kind": "solid", "location": "RUL", "diameter_mm": 5.0},
         {"kind": "solid", "location": "LLL", "diameter_mm": 12.0}]
    assert finding_stratum(f) == ("solid", "LLL", "8-16")
    assert finding_stratum([{"kind": "scratch", "location": {"x_mm": 3}, "length_mm": 40}]) == \
        ("scratch", "region", ">=32")


def test_example_specs_get_exact_split_counts():
    from schemas.plan import plan_sample, split_table
    from schemas.spec import load_spec

    ct = load_spec("examples/chest_ct_nodules.yaml")
    assert Counter(split_table(ct)) == {"train": 192, "val": 24, "test": 24}
    assert plan_sample(ct, 5).split == split_table(ct)[5]
    surf = load_spec("examples/surface_defects.yaml")
    fr = surf.splits
    assert Counter(split_table(surf)) == Counter(_expected(surf.samples, {"train": fr.train, "val": fr.val,
                                                                          "test": fr.test}))
