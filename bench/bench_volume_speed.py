"""Seconds per chest-CT volume on one CPU core, everything included: layout (anatomy, trees, nodules) +
render + measurements + QC + NIfTI write (image and label, gzip level 1) + provenance JSON. Also peak memory.

    python bench/bench_volume_speed.py [--volumes 3] [--size 512] [--slices 128]

Prints wall time and the process CPU time (single thread: the two agree on an idle core; on a shared machine
the CPU time is the one-core cost). Peak memory is the max resident set size of the process.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench._single_core  # noqa: E402,F401

import numpy as np  # noqa: E402

from flows.volume import make_volume, write_volume  # noqa: E402
from generators.volume_pipeline import VolumeRequest  # noqa: E402

FINDINGS = [{"kind": "solid", "diameter_mm": 8.0, "location": "RUL", "margin": "spiculated"},
            {"kind": "part_solid", "diameter_mm": 14.0, "location": "LLL", "margin": "lobulated"},
            {"kind": "ground_glass", "diameter_mm": 10.0, "location": "RLL"}]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--volumes", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=128)
    ap.add_argument("--spacing", type=float, nargs=3, default=[2.5, 0.7, 0.7], help="z y x mm")
    args = ap.parse_args()
    sp = tuple(args.spacing)
    if args.size != 512:  # same field of view at a coarser pixel
        sp = (sp[0], sp[1] * 512 / args.size, sp[2] * 512 / args.size)
    req = VolumeRequest((args.slices, args.size, args.size), sp, 0.5, FINDINGS)
    walls, cpus = [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.volumes):
            w, c = time.perf_counter(), time.process_time()
            vol = make_volume(req, seed=0, index=i)
            write_volume(vol, Path(d), f"v{i}")
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
            print(f"volume {i}: wall {walls[-1]:.2f} s, cpu {cpus[-1]:.2f} s, qc passed {vol['qc']['passed']}, "
                  f"attempts {vol['qc']['attempts']}", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.size}x{args.size}x{args.slices} at {sp[2]:.2f}x{sp[1]:.2f}x{sp[0]:.2f} mm, one core: "
          f"wall mean {np.mean(walls):.2f} s (min {min(walls):.2f}), cpu mean {np.mean(cpus):.2f} s "
          f"(min {min(cpus):.2f}); peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
