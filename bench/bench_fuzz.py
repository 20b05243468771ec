"""Fuzz pairforge's input surfaces with hypothesis: >= 10,000 inputs per target, counting how each ended.

    .venv/bin/python bench/bench_fuzz.py                 # 10,000 inputs per target
    .venv/bin/python bench/bench_fuzz.py --n 500         # a quick look

Targets (bench/fuzz_targets.py): the chest-CT shorthand, the surface shorthand, the spec loader (random and mutated
YAML/JSON documents plus a fixed list of hostile ones: alias bombs, deep nesting, huge numbers, NaN/inf, NUL bytes,
confusables, path-like names). An input must end accepted or refused with a one-line SpecError; anything else
(another exception, a multi-line refusal, a run over 10 s) is counted as a defect and printed. Exit 1 if any.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, given, settings  # noqa: E402

from bench.fuzz_targets import (CT_TEXT, SURFACE_TEXT, Defect, hostile_specs, load_spec, parse_ct,  # noqa: E402
                                parse_surface, run_target, spec_documents)

TARGETS = {
    "chest-CT shorthand": (parse_ct, CT_TEXT),
    "surface shorthand": (parse_surface, SURFACE_TEXT),
    "spec loader (YAML/JSON)": (load_spec, spec_documents()),
}


def fuzz(fn, strategy, n: int) -> tuple[Counter, list[str], float]:
    counts: Counter = Counter()
    defects: list[str] = []

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one(value):
        try:
            counts[run_target(fn, value)] += 1
        except Defect as e:
            counts["defect"] += 1
            if len(defects) < 20:
                defects.append(str(e)[:400])

    t0 = time.perf_counter()
    one()
    return counts, defects, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="inputs per target")
    args = ap.parse_args(argv)
    rows, all_defects = [], []
    for name, (fn, strategy) in TARGETS.items():
        counts, defects, secs = fuzz(fn, strategy, args.n)
        rows.append((name, sum(counts.values()), counts["ok"], counts["refused"], counts["defect"], secs))
        all_defects += [f"{name}: {d}" for d in defects]
        print(f"{name}: {dict(counts)} in {secs:.0f} s", flush=True)
    hostile = Counter()
    for name, (text, word) in hostile_specs().items():
        try:
            hostile[run_target(load_spec, text)] += 1
        except Defect as e:
            hostile["defect"] += 1
            all_defects.append(f"hostile {name}: {e}")
    rows.append(("hostile spec documents (fixed list)", sum(hostile.values()), hostile["ok"], hostile["refused"],
                 hostile["defect"], 0.0))
    print("\n| target | inputs | accepted | refused (one line) | defects | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, n, ok, ref, bad, secs in rows:
        print(f"| {name} | {n:,} | {ok:,} | {ref:,} | {bad} | {secs:.0f} |")
    for d in all_defects:
        print("DEFECT", d)
    return 1 if all_defects else 0


if __name__ == "__main__":
    raise SystemExit(main())
