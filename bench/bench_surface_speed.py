"""Milliseconds per 1024x1024 surface sample on one CPU core: layout + render + measure + QC, per material.

    .venv/bin/python bench/bench_surface_speed.py [--samples 24] [--size 1024]

The process is pinned to one core (sched_setaffinity) and OpenCV / BLAS run single-threaded. Each sample has
one to three defects (the example spec's mixture); defect-free samples are included at the spec's share (30 %).
Reports CPU time (time.process_time: what the sample costs one core, unaffected by other processes competing for
the core) per stage, median and mean, and the wall-clock median beside it; the first sample of each material is a
warm-up and is not counted.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotators import annotate  # noqa: E402
from flows.pipeline import backend_for  # noqa: E402
from schemas.plan import plan_sample  # noqa: E402
from schemas.seeding import STREAM_GENERATE, sample_rng  # noqa: E402
from schemas.spec import load_spec, spec_hash, validate_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MATERIALS = ["brushed_metal", "cast_metal", "painted", "plastic", "wood", "textile"]


def run(n: int, size: int) -> None:
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        pinned = "pinned to one core"
    except (AttributeError, OSError):
        pinned = "not pinned (no sched_setaffinity)"
    cv2.setNumThreads(1)
    base = load_spec(ROOT / "examples" / "surface_defects.yaml").model_dump(mode="json")
    print(f"{n} samples per material and colour, {size}x{size}, {pinned}, cv2 threads {cv2.getNumThreads()}")
    print(f"{'material':<15}{'colour':<7}{'layout':>8}{'render':>8}{'measure+QC':>12}{'total med':>11}"
          f"{'total mean':>12}{'wall med':>10}   (ms, CPU time unless wall)")
    all_tot = {"grey": [], "rgb": []}
    for color in ("grey", "rgb"):
        for material in MATERIALS:
            d = dict(base, material=material, image={"size": size, "color": color}, samples=n + 1)
            spec = validate_spec(d)
            digest, backend = spec_hash(spec), backend_for(spec)
            t_l, t_r, t_a, wall = [], [], [], []
            for i in range(n + 1):
                req = plan_sample(spec, i, digest)
                rng = sample_rng(digest, i, STREAM_GENERATE, 0)
                w0 = time.perf_counter()
                t0 = time.process_time()
                lay = backend.layout(spec, req, rng)
                t1 = time.process_time()
                img, _ = backend.render(lay, rng)
                t2 = time.process_time()
                annotate("surface", img, lay, req, spec.qc)
                t3 = time.process_time()
                if i:
                    t_l.append(t1 - t0), t_r.append(t2 - t1), t_a.append(t3 - t2)
                    wall.append(time.perf_counter() - w0)
            tot = np.array(t_l) + np.array(t_r) + np.array(t_a)
            all_tot[color] += list(tot)
            ms = lambda v: 1000 * float(np.median(v))  # noqa: E731
            print(f"{material:<15}{color:<7}{ms(t_l):>8.1f}{ms(t_r):>8.1f}{ms(t_a):>12.1f}{ms(tot):>11.1f}"
                  f"{1000 * tot.mean():>12.1f}{ms(wall):>10.1f}")
    for color, v in all_tot.items():
        print(f"all materials, {color}: CPU median {1000 * np.median(v):.1f} ms, mean {1000 * np.mean(v):.1f} ms, "
              f"p90 {1000 * np.percentile(v, 90):.1f} ms per sample")
    print(f"load average while running: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--size", type=int, default=1024)
    a = ap.parse_args()
    run(a.samples, a.size)
