"""Utility study on CPU (2D, 256 px): train-on-synthetic / test-on-reference (TSTR) Dice for nodules >= 6 mm, the
augmentation curve (k real stand-in images alone vs k real + N synthetic) with 95 % confidence intervals over seeds,
and label fidelity and realism distances of the synthetic set against each reference.

Two reference sets, and which is which:
- ``standin`` (generators/standin.py): the same phantom family with a different anatomy, calibration, texture,
  kernel, noise grain and spacing, which the synthetic set never saw. It is NOT real data. TSTR + augmentation.
- ``ct_small_inserted`` (flows/reference_chest_ct.py): pydicom's REAL CT slice CT_small.dcm with SYNTHETIC nodules
  (4-8 mm) inserted by pairforge's insertion route. Every sample shares the one real slice, so only TSTR (the
  segmenters trained on synthetic images alone, scored on it too) is clean; no augmentation curve on it.

    python bench/bench_evaluation.py                          # the full study (k = 10, 50, 200; 3 seeds; both)
    python bench/bench_evaluation.py --quick                  # minutes: tiny sizes, both references, to a temp dir
    python bench/bench_evaluation.py --reference standin      # the stand-in part only

Writes <out>/evaluation_study.json (its "references" entry holds label fidelity and realism per reference set and
the ct_small_inserted TSTR summary), <out>/evaluation_curve.png, and prints the tables for docs/evaluation.md.
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
    extra = d.get("extra_tests") if run.arm == "synthetic" else None
    r = run_utility(run, d["real_train"], d["real_test"], d["synthetic"], d["profile"], d["cfg"], extra)
    r["seconds"] = round(time.perf_counter() - t0, 1)
    r.pop("findings", None)
    for e in r.get("extra", {}).values():
        e.pop("findings", None)
    more = "".join(f"; on {n}: {e['finding_dice_ge_6mm']}" for n, e in r.get("extra", {}).items())
    print(f"  {run.arm:15s} k={run.k:<4d} seed={run.seed} nodule>=6mm Dice "
          f"{r['finding_dice_ge_6mm']}{more} ({r['seconds']} s)", flush=True)
    return r


def reference_report(name, synthetic, ref_rows, profile, opts):
    """Label fidelity of the synthetic set and of the reference (finding contrast against its ring, tissue
    medians), and the realism distances between them (per-class Wasserstein-1 in HU, noise power spectra)."""
    from flows.evaluate import label_fidelity, realism
    from flows.reference import ImageSet

    ref = ImageSet(name=name, kind=name, domain=profile.domain, images=[r["image"] for r in ref_rows],
                   spacings=[float(r["spacing_mm"]) for r in ref_rows], ids=[r["sample_id"] for r in ref_rows],
                   labels=[r["label"] for r in ref_rows], instances=[r["instance"] for r in ref_rows])
    syn = ImageSet(name="synthetic", kind="synthetic", domain=profile.domain, images=synthetic.images,
                   spacings=synthetic.spacings, ids=synthetic.ids, labels=synthetic.labels,
                   instances=synthetic.instances)
    out = {}
    for who, s in (("synthetic", syn), (name, ref)):
        lf = label_fidelity(s, profile, opts)
        out[f"label_fidelity_{who}"] = {k: lf[k] for k in ("findings", "failing", "failing_share", "passed", "cnr")}
        out[f"label_fidelity_{who}"]["tissue_medians"] = {t["class"]: t["median"] for t in lf["tissue"]}
    rl, _ = realism(syn, ref, profile, None)
    out["realism"] = {"wasserstein1_hu": rl["wasserstein1"], "nps_distance_decades": rl["nps"]["distance_decades"],
                      "noise_std_synthetic": rl["nps"]["noise_std_version"],
                      "noise_std_reference": rl["nps"]["noise_std_reference"], "classes_by": rl["classes_by"]}
    return out


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
    ap.add_argument("--reference", default="both", choices=("standin", "ct_small_inserted", "both"),
                    help="reference sets: the stand-in (NOT real), CT_small with inserted nodules (real background, "
                         "synthetic findings), or both")
    ap.add_argument("--n-ct-small", type=int, default=40, help="CT_small samples with inserted nodules (TSTR test)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a test of the bench (minutes); writes to a "
                                                         "temporary folder unless --out is given")
    ap.add_argument("--out", default=None, help="output folder (default docs, or a temporary folder with --quick)")
    a = ap.parse_args()
    if a.quick:
        a.size, a.n_synthetic, a.n_real, a.n_test, a.ks, a.seeds = 128, 10, 6, 4, "3", 2
        a.steps, a.patch, a.batch, a.workers, a.n_ct_small = 5, 32, 2, 1, 6
    if a.out is None:
        import tempfile

        a.out = tempfile.mkdtemp(prefix="bench-evaluation-") if a.quick else "docs"
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

    profile = profile_for("chest_ct")
    use_standin = a.reference in ("standin", "both")
    use_ct_small = a.reference in ("ct_small_inserted", "both")
    standin_train = standin_samples(a.n_real, size=a.size, seed=11) if use_standin else []
    standin_test = standin_samples(a.n_test, size=a.size, seed=12) if use_standin else []
    ct_small = []
    if use_ct_small:
        from flows.reference_chest_ct import ct_small_inserted_samples

        ct_small = ct_small_inserted_samples(a.n_ct_small, seed=12)
    t_data = time.perf_counter() - t0
    print(f"data: {a.n_synthetic} synthetic, {len(standin_train)} stand-in train pool, {len(standin_test)} stand-in "
          f"test, {len(ct_small)} CT_small with inserted nodules ({t_data:.0f} s)", flush=True)

    from flows.evaluate import EvalOptions

    references = {}
    if use_standin:
        references["standin"] = reference_report("standin", synthetic, standin_test, profile, EvalOptions())
    if use_ct_small:
        references["ct_small_inserted"] = reference_report("ct_small_inserted", synthetic, ct_small, profile,
                                                           EvalOptions())
    for n, rep in references.items():
        print(f"reference {n}: W1 (HU) {rep['realism']['wasserstein1_hu']}; NPS distance "
              f"{rep['realism']['nps_distance_decades']}; finding CNR median synthetic "
              f"{rep['label_fidelity_synthetic']['cnr']['median']} vs {n} {rep[f'label_fidelity_{n}']['cnr']['median']}",
              flush=True)

    # Without the stand-in the TSTR arm alone runs; its "real" sets are then CT_small (train unused).
    real_train = as_set(standin_train) if use_standin else as_set(ct_small)
    real_test = as_set(standin_test) if use_standin else as_set(ct_small)
    ks = [int(k) for k in a.ks.split(",") if int(k) <= a.n_real] if use_standin else []
    seeds = list(range(a.seeds))
    _DATA.update(real_train=real_train, real_test=real_test, synthetic=synthetic, profile=profile,
                 cfg=SegmenterConfig(patch=a.patch, steps=a.steps, batch=a.batch, threads=1, device=a.device),
                 extra_tests={"ct_small_inserted": as_set(ct_small)} if use_ct_small and use_standin else None)
    runs = plan_utility(ks, seeds, a.n_synthetic)
    if a.workers > 1:
        with mp.get_context("fork").Pool(a.workers) as pool:
            results = pool.map(_run, runs, chunksize=1)
    else:
        results = [_run(r) for r in runs]
    if use_ct_small:  # TSTR on CT_small: the synthetic-only segmenters, scored on it
        from annotators.evaluation import mean_ci

        tstr = [r.get("extra", {}).get("ct_small_inserted", r) for r in results if r["arm"] == "synthetic"]
        references["ct_small_inserted"]["tstr"] = {
            "finding_dice_ge_6mm": mean_ci([t["finding_dice_ge_6mm"] for t in tstr]),
            "finding_dice_lt_6mm": mean_ci([t["finding_dice_lt_6mm"] for t in tstr]),
            "nodule_dice": mean_ci([t["dice_per_class"]["nodule"] for t in tstr]),
            "n_findings_ge": tstr[0]["n_findings_ge"] if tstr else 0, "seeds": len(tstr)}
        print(f"TSTR on ct_small_inserted: {references['ct_small_inserted']['tstr']}", flush=True)
    if not use_standin:  # the utility table is about the stand-in only
        results = [r for r in results if r["arm"] == "synthetic"]
    study = {"runs": results, "summary": summarise_utility(results, profile), "ks": ks, "seeds": seeds,
             "references": references,
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
    for n, rep in references.items():
        print(f"| {n} | " + " | ".join(f"{c} {w:.0f}" for c, w in rep["realism"]["wasserstein1_hu"].items())
              + f" | NPS {rep['realism']['nps_distance_decades'] or float('nan'):.3f} decades |")
    print(f"written: {a.out}")
    print(f"total {study['seconds']} s on {study['machine']}; load average {study['load_average']}")


if __name__ == "__main__":
    main()
