"""Milliseconds per chest-CT sample on one CPU core: layout + render + measurements + QC (no file I/O).

    python bench/bench_ct_speed.py [--samples 200] [--size 512]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench._single_core  # noqa: E402,F401

import numpy as np  # noqa: E402

from flows.pipeline import make_samples  # noqa: E402
from schemas.spec import load_spec, validate_spec  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--spec", default=str(Path(__file__).resolve().parents[1] / "examples/chest_ct_nodules.yaml"))
    args = ap.parse_args()
    data = load_spec(args.spec).model_dump(mode="json")
    data["samples"] = args.samples
    data["image"]["size"] = args.size
    spec = validate_spec(data)
    make_samples(spec, range(3))  # warm-up (imports, caches)
    per = []
    for i in range(args.samples):
        t = time.perf_counter()
        make_samples(spec, [i])
        per.append(time.perf_counter() - t)
    ms = np.array(per) * 1000
    print(f"{args.samples} samples of {args.size}x{args.size} on one core: mean {ms.mean():.1f} ms, "
          f"median {np.median(ms):.1f} ms, p95 {np.percentile(ms, 95):.1f} ms (incl. QC regenerations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
