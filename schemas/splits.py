"""Train/val/test assignment: exact counts from the fractions, stratified, grouped, deterministic.

``assign_splits(keys, fractions, strata, groups)`` is the one place splits are decided:

- **exact counts**: the split sizes are the largest-remainder rounding of ``fraction * n`` (240 at 0.8/0.1/0.1 gives
  192/24/24, never 207/18/15);
- **stratified**: inside every stratum (e.g. finding kind x location x size band) each split gets its share, rounded
  so that the strata add up to the exact totals (controlled rounding: every cell is within one sample of
  ``fraction * stratum size``);
- **grouped**: samples with the same group (a source scan, a patient) go to one split together; the totals are then
  as close as the group sizes allow;
- **deterministic**: which member of a stratum goes where follows a hash of ``seed`` and the sample's key, so the same
  inputs always give the same list, and the order of the inputs does not matter.
"""
from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from typing import Hashable, Mapping, Sequence


def largest_remainder(fractions: Sequence[float], n: int) -> list[int]:
    """Integers summing to ``n``, each ``floor(f * n)`` or one more; the largest remainders get the extra ones (ties:
    the earlier entry)."""
    total = float(sum(fractions))
    if n < 0 or total <= 0:
        raise ValueError("largest_remainder needs n >= 0 and fractions with a positive sum")
    quotas = [f / total * n for f in fractions]
    counts = [int(q) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def controlled_rounding(rows: Sequence[int], cols: Sequence[int]) -> list[list[int]]:
    """An integer table with the given row sums and column sums (equal totals), each cell within one of the ideal
    ``rows[h] * cols[s] / total``: floors first, then the leftover units to the largest fractional parts whose row
    and column still need one."""
    total = sum(rows)
    if total != sum(cols):
        raise ValueError("row and column totals differ")
    if total == 0:
        return [[0] * len(cols) for _ in rows]
    ideal = [[r * c / total for c in cols] for r in rows]
    table = [[int(v) for v in row] for row in ideal]
    need_r = [r - sum(t) for r, t in zip(rows, table)]
    need_c = [c - sum(table[h][s] for h in range(len(rows))) for s, c in enumerate(cols)]
    cells = sorted(((ideal[h][s] - table[h][s], h, s) for h in range(len(rows)) for s in range(len(cols))),
                   key=lambda x: (-x[0], x[1], x[2]))
    for _frac, h, s in cells:
        if need_r[h] > 0 and need_c[s] > 0:
            table[h][s] += 1
            need_r[h] -= 1
            need_c[s] -= 1
    # A transportation problem with equal totals always completes; the loop above only runs out of fractional
    # parts, never of room, so any leftover goes to any open (row, column).
    for h in range(len(rows)):
        for s in range(len(cols)):
            k = min(need_r[h], need_c[s])
            if k > 0:
                table[h][s] += k
                need_r[h] -= k
                need_c[s] -= k
    return table


def _order_key(seed: str, key: Hashable) -> str:
    return hashlib.sha256(f"{seed}|{key!r}".encode()).hexdigest()


def assign_splits(keys: Sequence[Hashable], fractions: Mapping[str, float],
                  strata: Sequence[Hashable] | None = None, groups: Sequence[Hashable | None] | None = None,
                  seed: str = "") -> list[str]:
    """The split name of each key (same order as ``keys``). ``fractions``: {split name: fraction}, in the order the
    splits should be listed; zero fractions get no samples. ``strata``: one stratum label per key (None: one stratum).
    ``groups``: one group label per key, or None for a key of its own; a group is never divided. ``seed``: varies
    which members of a stratum go where (a spec hash)."""
    n = len(keys)
    names = list(fractions)
    fr = [float(fractions[s]) for s in names]
    if any(f < 0 for f in fr) or sum(fr) <= 0:
        raise ValueError(f"split fractions must be >= 0 with a positive sum, not {dict(fractions)}")
    strata = list(strata) if strata is not None else [None] * n
    groups = list(groups) if groups is not None else [None] * n
    if len(strata) != n or len(groups) != n:
        raise ValueError("keys, strata and groups must have the same length")
    if n == 0:
        return []
    totals = largest_remainder(fr, n)

    # Units: a group's members together, anything else alone. A unit's stratum: its members' most common one.
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[("group", g) if g is not None else ("key", i)].append(i)
    unit_stratum = {}
    for u, idx in members.items():
        counts = Counter(repr(strata[i]) for i in idx)
        unit_stratum[u] = min(counts, key=lambda s: (-counts[s], s))

    by_stratum: dict[str, list[Hashable]] = defaultdict(list)
    for u in members:
        by_stratum[unit_stratum[u]].append(u)
    labels = sorted(by_stratum)
    sizes = [sum(len(members[u]) for u in by_stratum[h]) for h in labels]
    cell = controlled_rounding(sizes, totals)  # per stratum, per split: how many samples

    out: list[str | None] = [None] * n
    filled = [0] * len(names)
    for h, label in enumerate(labels):
        # Big groups first (they fit only where there is room), then an order fixed by the seed and the keys.
        units = sorted(by_stratum[label], key=lambda u: (-len(members[u]),
                                                          _order_key(seed, tuple(keys[i] for i in members[u]))))
        here = [0] * len(names)
        for u in units:
            size = len(members[u])
            s = max(range(len(names)), key=lambda j: (cell[h][j] - here[j] >= size, cell[h][j] - here[j],
                                                       totals[j] - filled[j], -j))
            here[s] += size
            filled[s] += size
            for i in members[u]:
                out[i] = names[s]
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ strata of findings
def size_band(size_mm: float | None) -> str:
    """Octave bands of a finding's size: '<2', '2-4', '4-8', '8-16', '16-32', '>=32' mm."""
    if size_mm is None:
        return "-"
    for lo, hi in ((0, 2), (2, 4), (4, 8), (8, 16), (16, 32)):
        if size_mm < hi:
            return f"<{hi}" if lo == 0 else f"{lo}-{hi}"
    return ">=32"


def finding_stratum(findings: Sequence[Mapping]) -> tuple[str, str, str]:
    """(kind, location, size band) of a sample's largest finding; ('negative', '-', '-') without findings.
    Works on any domain's finding dicts: size is ``diameter_mm``, else ``length_mm``, else ``size_mm``."""
    if not findings:
        return ("negative", "-", "-")

    def size(f: Mapping) -> float | None:
        for k in ("diameter_mm", "length_mm", "size_mm"):
            v = f.get(k)
            if isinstance(v, (int, float)):
                return float(v)
        return None

    big = max(findings, key=lambda f: size(f) or 0.0)
    loc = big.get("location")
    loc = loc if isinstance(loc, str) else ("region" if loc else "-")
    return (str(big.get("kind", "?")), loc, size_band(size(big)))
