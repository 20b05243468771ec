"""Utility study on CPU (2D, 256 px): train-on-synthetic / test-on-stand-in (TSTR) Dice for nodules >= 6 mm, and the
augmentation curve (k real stand-in images alone vs k real + N synthetic), with 95 % confidence intervals over seeds.

"Real" here is the chest-CT stand-in (generators/standin.py): the same phantom family with a different anatomy,
calibration, texture, kernel, noise grain and spacing, which the synthetic set never saw. It is NOT real data.

    python bench/bench_evaluation.py                          # the full study (k = 10, 50, 200; 3 seeds)
    python bench/bench_evaluation.py --steps 20 --ks 10 --seeds 2 --n-test 10 --n-real 20 --n-synthetic 20  # smoke

Writes <out>/evaluation_study.json and <out>/evaluation_curve.png and prints the table for docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STUDY_SPEC = """
name: study-synthetic
domain: chest_ct
samples: {n}
seed: 3
image: {{size: {size}, spacing_mm: [1.2, 1.4]}}
slice_level: [0.2, 0.9]
findings:
  negatives: 0.1
  mixture:
    - {{kind: solid, diameter_mm: [4, 20], location: any, margin: smooth}}
    - {{kind: solid, diameter_mm: [4, 20], location: any, margin: lobulated}}
    - {{kind: solid, diameter_mm: [5, 20], location: any, margin: spiculated}}
    - {{kind: part_solid, diameter_mm: [6, 20], location: any}}
    - {{kind: ground_glass, diameter_mm: [6, 20], location: any}}
"""

_DATA: dict = {}


def _run(run):
    from annotators.utility import run_utility

    d = _DATA
    t0 = time.perf_counter()
    r = run_utility(run, d["real_train"], d["real_test"], d["synthetic"], d["profile"], d["cfg"])
    r["seconds"] = round(time.perf_counter() - t0, 1)
    r.pop("findings", None)
    print(f"  {run.arm:15s} k={run.k:<4d} seed={run.seed} nodule>=6mm Dice "
          f"{r['finding_dice_ge_6mm']} ({r['seconds']} s)", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--n-synthetic", type=int, default=200)
    ap.add_argument("--n-real", type=int, default=200, help="stand-in training pool (k draws from it)")
    ap.add_argument("--n-test", type=int, default=60, help="held-out stand-in test images")
    ap.add_argument("--ks", default="10,50,200")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--patch", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="training runs in parallel (one thread each)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (a GPU runs the same study faster)")
    ap.add_argument("--out", default="docs")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import multiprocessing as mp

    import torch

    from annotators.evaluation import profile_for
    from annotators.segmenter import SegmenterConfig
    from annotators.utility import LabelledSet, plan_utility, summarise_utility
    from flows.evaluate import utility_plot, utility_table
    from flows.pipeline import make_samples
    from generators.standin import standin_samples
    from schemas.spec import load_spec_text

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    spec = load_spec_text(STUDY_SPEC.format(n=a.n_synthetic, size=a.size))
    syn = make_samples(spec, range(a.n_synthetic))
    synthetic = LabelledSet([s.image for s in syn], [s.label for s in syn], [s.instance for s in syn],
                            [s.spacing_mm for s in syn], [s.sample_id for s in syn])

    def as_set(rows):
        return LabelledSet([r["image"] for r in rows], [r["label"] for r in rows], [r["instance"] for r in rows],
                           [r["spacing_mm"] for r in rows], [r["sample_id"] for r in rows])

    real_train = as_set(standin_samples(a.n_real, size=a.size, seed=11))
    real_test = as_set(standin_samples(a.n_test, size=a.size, seed=12))
    t_data = time.perf_counter() - t0
    print(f"data: {a.n_synthetic} synthetic, {a.n_real} stand-in train pool, {a.n_test} stand-in test "
          f"({t_data:.0f} s)", flush=True)

    ks = [int(k) for k in a.ks.split(",") if int(k) <= a.n_real]
    seeds = list(range(a.seeds))
    _DATA.update(real_train=real_train, real_test=real_test, synthetic=synthetic, profile=profile_for("chest_ct"),
                 cfg=SegmenterConfig(patch=a.patch, steps=a.steps, batch=a.batch, threads=1, device=a.device))
    runs = plan_utility(ks, seeds, a.n_synthetic)
    if a.workers > 1:
        with mp.get_context("fork").Pool(a.workers) as pool:
            results = pool.map(_run, runs, chunksize=1)
    else:
        results = [_run(r) for r in runs]
    profile = _DATA["profile"]
    study = {"runs": results, "summary": summarise_utility(results, profile), "ks": ks, "seeds": seeds,
             "n_synthetic": a.n_synthetic, "n_real_train": a.n_real, "n_real_test": a.n_test,
             "settings": vars(a), "seconds": round(time.perf_counter() - t0, 1),
             "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                        f"torch {torch.__version__}", "load_average": os.getloadavg()}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "evaluation_study.json"), "w") as f:
        json.dump(study, f, indent=1, default=float)
    with open(os.path.join(a.out, "evaluation_curve.png"), "wb") as f:
        f.write(utility_plot(study)["utility_curve.png"])
    print("\n".join(utility_table(study)))
    print(f"total {study['seconds']} s on {study['machine']}; load average {study['load_average']}")


if __name__ == "__main__":
    main()
