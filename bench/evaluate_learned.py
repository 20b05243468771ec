"""`pairforge evaluate` on what a trained model renders: a small version built with the ``learned`` backend, next to
the same spec built with the default ``procedural`` backend, both against the held-out stand-in pairs the model
never saw (and, for memorisation, against the pairs it was trained on).

    python bench/train_gpu.py --cpu-reduced --out bench_out/train_cpu.json --work /tmp/pf_train     # the model
    python bench/evaluate_learned.py --model /tmp/pf_train/model --size 64 --pairs 300 --held-out 100 \\
        --out bench_out/evaluate_learned.json

1. Reference folders: the same stand-in pairs ``bench/train_gpu.py`` trained on (same seed, size and counts), written
   as uint16 PNGs (HU + 1024) with ``_label`` PNGs and a ``spacing.json``: ``train/`` (the model's training pairs,
   ``--train-ref``) and ``heldout/`` (``--real``).
2. Two versions of one chest-CT spec at the model's size and spacing (at most 4.6-5 mm, the spec's limit) (``--samples`` each): ``learned`` and
   ``procedural`` generators, built with ``pairforge build``.
3. ``pairforge evaluate learned@v1 --real heldout --against procedural@v1 --train-ref train``; the two
   ``evaluation.json`` summaries are copied into the report at ``--out``.
Runs the CLI as a user would (subprocesses with this checkout on PYTHONPATH).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def write_folder(rows: list[dict], folder: Path) -> int:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    spacing = {}
    for r in rows:
        stem = f"standin_{r['index']:06d}"
        hu = np.clip(np.round(r["standin"]) + 1024, 0, 65535).astype(np.uint16)
        cv2.imwrite(str(folder / f"{stem}.png"), hu)
        cv2.imwrite(str(folder / f"{stem}_label.png"), r["label"].astype(np.uint8))
        spacing[stem] = float(r["spacing_mm"])
    (folder / "spacing.json").write_text(json.dumps(spacing, indent=0))
    return len(rows)


def version_spec(name: str, generator: dict, size: int, spacing: tuple[float, float], n: int) -> dict:
    return {"name": name, "domain": "chest_ct", "samples": n, "seed": 5,
            "image": {"size": size, "spacing_mm": [round(spacing[0], 3), round(spacing[1], 3)]},
            "slice_level": [0.25, 0.9],
            "findings": {"negatives": 0.2, "mixture": [
                {"kind": "solid", "diameter_mm": [10, 24], "location": "any"},
                {"kind": "part_solid", "diameter_mm": [10, 24], "location": "any"},
                {"kind": "ground_glass", "diameter_mm": [10, 24], "location": "any"}]},
            "generator": generator, "splits": {"train": 0.8, "val": 0.1, "test": 0.1}, "watermark": False,
            "shard_size": 20}


def cli(*args: str) -> str:
    env = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600",  # a busy machine starts the server slowly
           **os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True)
    print(f"$ pairforge {' '.join(args)}  ({time.perf_counter() - t0:.0f} s)\n{res.stdout}{res.stderr}", flush=True)
    if res.returncode != 0:
        raise SystemExit(f"pairforge {args[0]} failed (exit {res.returncode})")
    return res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model folder written by bench/train_gpu.py (--work/model)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--held-out", type=int, default=100)
    ap.add_argument("--samples", type=int, default=60, help="samples per evaluated version")
    ap.add_argument("--steps", type=int, default=150, help="segmenter training steps of the evaluation")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work", default="/tmp/pairforge_evaluate_learned")
    ap.add_argument("--out", default="bench_out/evaluate_learned.json")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    from train_gpu import make_pairs, standin_config

    work = Path(a.work)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    data = make_pairs(a.size, a.pairs, a.held_out, a.workers)
    n_tr = write_folder(data["train"], work / "ref" / "train")
    n_ho = write_folder(data["held"], work / "ref" / "heldout")
    print(f"reference folders: {n_tr} training pairs, {n_ho} held-out pairs", flush=True)
    # The model's spacing, within what a chest-CT spec accepts (<= 5 mm; at 64 px the stand-in shows 5.2-6.4 mm,
    # the learned backend renders spacings within 1.5x of its training spacing).
    sp = tuple(min(v, 5.0 - 0.4 * (1 - i)) for i, v in enumerate(standin_config(a.size).spacing_mm))
    root = work / "store"
    specs = {"learned": {"name": "learned", "options": {"model": str(Path(a.model).resolve()), "device": a.device}},
             "procedural": {"name": "procedural"}}
    import yaml

    for name, gen in specs.items():
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(version_spec(f"standin-look-{name}", gen, a.size, sp, a.samples),
                                       sort_keys=False))
        cli("build", str(path), "--root", str(root))
    common = ["--real", str(work / "ref" / "heldout"), "--train-ref", str(work / "ref" / "train"),
              "--steps", str(a.steps), "--no-utility", "--device", a.device, "--root", str(root)]
    text = cli("evaluate", "standin-look-learned@v1", "--against", "standin-look-procedural@v1", *common)
    reports = {}
    for name in specs:
        found = sorted((root / "_evaluations" / f"standin-look-{name}" / "v1").glob("*/evaluation.json"))
        if found:
            reports[name] = json.loads(found[-1].read_text())
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "reference": {"train": n_tr, "held_out": n_ho,
                                                               "spacing_mm": list(sp)},
                               "cli_summary": text, "evaluations": reports}, indent=1, default=float))
    print(f"report {out}")


if __name__ == "__main__":
    main()
