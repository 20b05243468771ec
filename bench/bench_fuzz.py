"""Fuzz pairforge's input surfaces with hypothesis: >= 10,000 inputs per target, counting how each ended.

    .venv/bin/python bench/bench_fuzz.py                 # 10,000 inputs per target
    .venv/bin/python bench/bench_fuzz.py --n 500         # a quick look
    .venv/bin/python bench/bench_fuzz.py --only "pairforge show,pairforge ls"   # some targets (names as printed)

Targets (bench/fuzz_targets.py): the chest-CT shorthand, the surface shorthand, the spec loader (random and mutated
YAML/JSON documents plus a fixed list of hostile ones: alias bombs, deep nesting, huge numbers, NaN/inf, NUL bytes,
confusables, path-like names), and every `pairforge` subcommand's arguments (bench/fuzz_cli.py: in process, in a
sandbox folder, writes outside it refused and counted). An input must end accepted or refused with a one-line SpecError; anything else
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


def fuzz(fn, strategy, n: int, judge=run_target) -> tuple[Counter, list[str], float]:
    """Run ``fn`` on ``n`` inputs drawn from ``strategy`` through ``judge`` (which names the ending or raises
    Defect); count endings, keep the first 20 defects."""
    counts: Counter = Counter()
    defects: list[str] = []

    t0 = time.perf_counter()

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one(value):
        total = sum(counts.values())
        if total and total % 1000 == 0:
            print(f"  ... {total:,} inputs: {dict(counts)} in {time.perf_counter() - t0:.0f} s", flush=True)
        try:
            counts[judge(fn, value)] += 1
        except Defect as e:
            counts["defect"] += 1
            if len(defects) < 20:
                defects.append(str(e)[:400])
                print(f"  DEFECT {str(e)[:400]}", flush=True)

    t0 = time.perf_counter()
    one()
    return counts, defects, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="inputs per target")
    ap.add_argument("--only", default="", help="comma-separated target names (as printed); default: all")
    args = ap.parse_args(argv)
    only = {t.strip() for t in args.only.split(",") if t.strip()}
    rows, all_defects = [], []
    for name, (fn, strategy) in TARGETS.items():
        if only and name not in only:
            continue
        counts, defects, secs = fuzz(fn, strategy, args.n)
        rows.append((name, sum(counts.values()), counts["ok"], counts["refused"], counts["defect"], secs))
        all_defects += [f"{name}: {d}" for d in defects]
        print(f"{name}: {dict(counts)} in {secs:.0f} s", flush=True)
    if not only or "hostile spec documents (fixed list)" in only:
        hostile = Counter()
        for name, (text, word) in hostile_specs().items():
            try:
                hostile[run_target(load_spec, text)] += 1
            except Defect as e:
                hostile["defect"] += 1
                all_defects.append(f"hostile {name}: {e}")
        rows.append(("hostile spec documents (fixed list)", sum(hostile.values()), hostile["ok"], hostile["refused"],
                     hostile["defect"], 0.0))
    cli_rows, cli_defects, violations = fuzz_cli(args.n, only)
    all_defects += cli_defects + [f"write outside the sandbox: {v}" for v in violations]
    print("\n| target | inputs | accepted | refused (one line) | defects | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, n, ok, ref, bad, secs in rows:
        print(f"| {name} | {n:,} | {ok:,} | {ref:,} | {bad} | {secs:.0f} |")
    if cli_rows:
        print("\n| target | inputs | exit 0 | exit 2, one line | verify exit 1 | reached orchestration | defects | "
              "seconds |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, c, secs in cli_rows:
            print(f"| {name} | {sum(c.values()):,} | {c['ok']:,} | {c['refused']:,} | {c['verdict']:,} | "
                  f"{c['orchestration']:,} | {c['defect']} | {secs:.0f} |")
        print(f"writes outside the sandbox: {len(violations)}")
    for d in all_defects:
        print("DEFECT", d)
    return 1 if all_defects else 0


def fuzz_cli(n: int, only: set[str]) -> tuple[list, list[str], list[str]]:
    """Every subcommand's arguments, ``n`` inputs each, in one sandbox (bench/fuzz_cli.py)."""
    from bench.fuzz_cli import argv_strategy, commands, fuzz_session, run_cli_target

    names = [c for c in commands() if not only or f"pairforge {c}" in only]
    if not names:
        return [], [], []
    rows, defects = [], []
    with fuzz_session() as sb:
        for c in names:
            counts, found, secs = fuzz(sb, argv_strategy(c, sb), n, judge=run_cli_target)
            rows.append((f"pairforge {c}", counts, secs))
            defects += [f"pairforge {c}: {d}" for d in found]
            print(f"pairforge {c}: {dict(counts)} in {secs:.0f} s", flush=True)
    return rows, defects, list(sb.violations)


if __name__ == "__main__":
    raise SystemExit(main())
