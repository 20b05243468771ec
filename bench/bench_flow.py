"""Orchestration overhead of the build flow: samples/s of the full Prefect flow vs a bare Python loop doing the same
work, and Dask with 1 vs 2 workers.

The same work everywhere: for every planned shard, ``flows.pipeline.make_samples`` + ``BuildStaging.write_shard``
(watermark, PNG encode, write, Parquet part, commit marker), then ``publish`` with the dataset card. Each run writes
into a fresh root, so nothing is reused. The bare loop runs shards one after another (``--workers 1``) or in a
``concurrent.futures.ProcessPoolExecutor`` with the same number of worker processes as the flow's runner.

Flow timings start at the flow call with the Prefect API already up (a long-lived API, as with a server or
``pairforge serve``); the one-off start of the embedded ephemeral API is measured and reported separately.

    python bench/bench_flow.py --samples 2000 --workers 2 --out bench/results_flow.json
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flows import settings  # noqa: E402  (Prefect defaults before prefect is imported)

settings.silence_shutdown_noise()

import yaml  # noqa: E402

from flows import build as fb  # noqa: E402
from flows.card import card  # noqa: E402
from flows.pipeline import make_samples  # noqa: E402
from schemas.plan import plan_shards  # noqa: E402
from schemas.spec import spec_hash  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "chest_ct_nodules.yaml"


def bench_spec_text(samples: int, size: int, shard_size: int) -> str:
    d = yaml.safe_load(EXAMPLE.read_text())
    d.update(name="bench-ct", samples=samples, shard_size=shard_size)
    d["image"]["size"] = size
    return yaml.safe_dump(d, sort_keys=False)


def _bare_shard(spec, staging, i: int, start: int, stop: int) -> int:
    """One shard, no orchestration: the same calls the flow's shard task makes, with the same arguments."""
    samples = make_samples(spec, range(start, stop), digest=staging.digest)
    staging.write_shard(i, samples)
    return len(samples)


def bare_loop(spec_text: str, root: str, workers: int) -> dict:
    from store import DatasetStore

    t0 = time.perf_counter()
    spec, text = fb.resolve_spec(spec_text)
    staging = DatasetStore(root).open_build(spec, text, spec_hash(spec), fb.code_version())
    shards = plan_shards(spec.samples, spec.shard_size)
    args = [(spec, staging, i, r.start, r.stop) for i, r in enumerate(shards)]
    if workers == 1:
        t_start = time.perf_counter()
        n = sum(_bare_shard(*x) for x in args)
    else:
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            t_start = time.perf_counter()
            n = sum(ex.map(_bare_shard, *zip(*args)))
    t_shards = time.perf_counter()
    staging.publish(card=card)
    t_end = time.perf_counter()
    return {"samples": n, "seconds": t_end - t0, "phases": {"start": t_start - t0, "shards": t_shards - t_start,
                                                             "publish": t_end - t_shards}}


def flow_run(spec_text: str, root: str, runner: str, workers: int) -> dict:
    """The flow as `pairforge build` runs it. Phases from the flow's own events: start (task runner and cluster
    start, open the staging area), shards (first submit to last shard done), publish (samples.parquet, card)."""
    marks: dict[str, float] = {}

    def on_event(ev: dict) -> None:
        now = time.perf_counter()
        if ev["event"] == "plan":
            marks["plan"] = now
        elif ev["event"] == "shard":
            marks["last_shard"] = now

    t0 = time.perf_counter()
    with fb.reporting_to(on_event):
        s = fb.run_build(spec_text, root=root, runner=runner, workers=workers)
    t_end = time.perf_counter()
    return {"samples": s["samples"], "seconds": t_end - t0, "generated_shards": s["generated"],
            "phases": {"start": marks["plan"] - t0, "shards": marks["last_shard"] - marks["plan"],
                       "publish": t_end - marks["last_shard"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--shard-size", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", default="bare_par,flow_local,flow_processes,dask2,dask1,bare_seq,flow_seq",
                    help="comma list of: bare_seq, bare_par, flow_local (the default runner), flow_processes, flow_threads, "
                         "flow_seq (default runner, 1 worker), dask1, dask2")
    ap.add_argument("--repeat", type=int, default=1, help="run the whole list this many times; ratios use medians")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()

    text = bench_spec_text(a.samples, a.size, a.shard_size)
    runs = {
        "bare_seq": lambda root: bare_loop(text, root, 1),
        "bare_par": lambda root: bare_loop(text, root, a.workers),
        "flow_seq": lambda root: flow_run(text, root, "local", 1),
        "flow_local": lambda root: flow_run(text, root, "local", a.workers),
        "flow_processes": lambda root: flow_run(text, root, "processes", a.workers),
        "flow_threads": lambda root: flow_run(text, root, "threads", a.workers),
        "dask1": lambda root: flow_run(text, root, "dask", 1),
        "dask2": lambda root: flow_run(text, root, "dask", a.workers),
    }
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "processor": platform.processor() or platform.machine(),
                                 "python": platform.python_version()},
                     "samples": a.samples, "size": a.size, "shard_size": a.shard_size, "workers": a.workers,
                     "command": " ".join(["python"] + sys.argv), "runs": {}}
    t0 = time.perf_counter()
    with settings.prefect_api() as api:
        results["api_start_seconds"] = time.perf_counter() - t0
        results["api"] = "ephemeral" if "127.0.0.1" in api else api
        names = a.only.split(",")
        for rep in range(a.repeat):
            # Repetitions alternate the order so slow drifts in machine load hit every configuration alike.
            for name in (names if rep % 2 == 0 else names[::-1]):
                root = tempfile.mkdtemp(prefix=f"pf-bench-{name}-")
                load_before = os.getloadavg()[0]
                try:
                    r = runs[name](root)
                finally:
                    shutil.rmtree(root, ignore_errors=True)
                # Other work on the machine skews a run; the 1-minute load average is recorded beside it.
                r["loadavg_1m_before"], r["loadavg_1m_after"] = load_before, os.getloadavg()[0]
                r["samples_per_s"] = r["samples"] / r["seconds"]
                results["runs"].setdefault(name, []).append(r)
                ph = r["phases"]
                print(f"{name:15s} {r['samples']:6d} samples {r['seconds']:8.1f} s {r['samples_per_s']:7.2f} "
                      f"samples/s [start {ph['start']:.1f} s, shards {ph['shards']:.1f} s, publish "
                      f"{ph['publish']:.1f} s] (load {r['loadavg_1m_before']:.1f} -> {r['loadavg_1m_after']:.1f})",
                      flush=True)
    # Per configuration, over its repetitions: total samples / total seconds.
    R = {}
    for k, v in results["runs"].items():
        n, sec = sum(r["samples"] for r in v), sum(r["seconds"] for r in v)
        shard_sec = sum(r["phases"]["shards"] for r in v)
        R[k] = {"samples": n / len(v), "seconds": sec / len(v), "samples_per_s": n / sec, "runs": len(v),
                "phases": {p: sum(r["phases"][p] for r in v) / len(v) for p in ("start", "shards", "publish")},
                "shard_phase_samples_per_s": n / shard_sec}
    results["aggregate"] = R
    ratios = {}
    if "flow_processes" in R and "bare_par" in R:
        ratios["flow_processes / bare_par"] = R["flow_processes"]["samples_per_s"] / R["bare_par"]["samples_per_s"]
    if "flow_local" in R and "bare_par" in R:
        ratios["flow_local / bare_par"] = R["flow_local"]["samples_per_s"] / R["bare_par"]["samples_per_s"]
        ratios["flow_local incl. API start / bare_par"] = (
            R["flow_local"]["samples"] / (R["flow_local"]["seconds"] + results["api_start_seconds"])) / \
            R["bare_par"]["samples_per_s"]
    if "flow_threads" in R and "bare_par" in R:
        ratios["flow_threads / bare_par"] = R["flow_threads"]["samples_per_s"] / R["bare_par"]["samples_per_s"]
    if "flow_seq" in R and "bare_seq" in R:
        ratios["flow_seq / bare_seq"] = R["flow_seq"]["samples_per_s"] / R["bare_seq"]["samples_per_s"]
    if "dask1" in R and "dask2" in R:
        ratios["dask2 / dask1"] = R["dask2"]["samples_per_s"] / R["dask1"]["samples_per_s"]
        ratios["dask2 / dask1, shard phase only"] = (R["dask2"]["shard_phase_samples_per_s"]
                                                     / R["dask1"]["shard_phase_samples_per_s"])
    results["ratios"] = ratios
    print(f"API start {results['api_start_seconds']:.1f} s")
    for k, v in ratios.items():
        print(f"{k:45s} {v:.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
