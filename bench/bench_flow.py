"""Orchestration overhead of the build flow: samples/s of the full Prefect flow vs a bare Python loop doing the same
work, and Dask with 1 vs 2 workers.

The same work everywhere: for every planned shard, ``flows.pipeline.make_samples`` + ``BuildStaging.write_shard``
(watermark, PNG encode, write, Parquet part, commit marker), then ``publish`` with the dataset card. Each run writes
into a fresh root, so nothing is reused. The bare loop runs shards one after another (``--workers 1``) or in a
``concurrent.futures.ProcessPoolExecutor`` with the same number of worker processes as the flow's runner, forked (on
Linux) after the same imports, as a competent user's script would be.

Two ways to time it:

* end to end, as commands (``cli_build``, ``cli_bare``): ``pairforge build SPEC`` on the embedded defaults (it starts
  its own local Prefect API) against a bare-loop script (``bench_flow.py --bare-run``), each timed from process
  launch to exit, imports, API start and interpreter exit included. This is "the full flow vs a bare loop".
  ``cli_build_api`` is the same command with PREFECT_API_URL naming an API started once before the runs (as
  scheduled builds under ``pairforge serve`` or a Prefect server run): the build without the API server's start.
* in process (``flow_*``, ``dask*``, ``bare_*``): from the flow call to its return with the Prefect API already up
  (a long-lived API, as with a server or ``pairforge serve``), to see where the time goes (phases).

    python bench/bench_flow.py --samples 2000 --only cli_bare,cli_build --repeat 2 --out results.json
    python bench/bench_flow.py --samples 2000 --only dask2,dask1 --repeat 2 --out results.json
"""
from __future__ import annotations

import argparse
import contextlib
import concurrent.futures as cf
import functools
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flows import settings  # noqa: E402  (Prefect defaults before prefect is imported)

settings.silence_shutdown_noise()

import yaml  # noqa: E402

from flows.browser import sample_files as browser_files  # noqa: E402  (the browser's per-sample images)
from flows.card import card  # noqa: E402
from flows.inputs import code_version, resolve_spec  # noqa: E402  (no Prefect import: the bare loop stays bare)
from flows.pipeline import make_samples  # noqa: E402
from schemas.plan import plan_shards  # noqa: E402
from schemas.spec import spec_hash  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PAIRFORGE = str(Path(sys.executable).with_name("pairforge"))

# In-process configurations: name -> (task runner kind, or None for the bare loop; workers, None = --workers).
IN_PROCESS = {
    "bare_seq": (None, 1), "bare_par": (None, None),
    "flow_seq": ("local", 1), "flow_local": ("local", None), "flow_processes": ("processes", None),
    "flow_threads": ("threads", None), "dask1": ("dask", 1), "dask2": ("dask", None),
}
# Ratios of samples/s reported when both configurations ran: (numerator, denominator, label).
RATIOS = [
    ("flow_processes", "bare_par", "flow_processes / bare_par"),
    ("flow_local", "bare_par", "flow_local / bare_par"),
    ("flow_threads", "bare_par", "flow_threads / bare_par"),
    ("flow_seq", "bare_seq", "flow_seq / bare_seq"),
    ("cli_build", "cli_bare", "cli_build / cli_bare (end to end)"),
    ("cli_build", "cli_bare_tuned", "cli_build / cli_bare_tuned (end to end)"),
    ("dask2", "dask1", "dask2 / dask1"),
]


EXAMPLES = ("chest_ct_nodules", "surface_defects")  # the 2D example specs the bench can run


def bench_spec_text(samples: int, size: int | None, shard_size: int | str, example: str = "chest_ct_nodules") -> str:
    """The example spec ``examples/<example>.yaml`` with ``samples``; ``size`` the image size (None: the example's
    own); ``shard_size`` an integer, "example" (as shipped) or "unset" (the spec default a user who leaves it out
    gets)."""
    if example not in EXAMPLES:
        raise ValueError(f"unknown example {example!r}; accepted: {', '.join(EXAMPLES)}")
    d = yaml.safe_load((REPO / "examples" / f"{example}.yaml").read_text())
    d.update(name="bench-ct" if example == "chest_ct_nodules" else f"bench-{d.get('domain', example)}",
             samples=samples)
    if shard_size == "unset":
        d.pop("shard_size", None)
    elif shard_size != "example":
        d["shard_size"] = int(shard_size)
    if size is not None:
        d["image"]["size"] = size
    return yaml.safe_dump(d, sort_keys=False)


def _bare_shard(spec, staging, i: int, start: int, stop: int) -> int:
    """One shard, no orchestration: the same calls the flow's shard task makes, with the same arguments."""
    samples = make_samples(spec, range(start, stop), digest=staging.digest)
    staging.write_shard(i, samples, sample_files=browser_files)
    return len(samples)


def bare_loop(spec_text: str, root: str, workers: int) -> dict:
    from store import DatasetStore

    t0 = time.perf_counter()
    spec, text = resolve_spec(spec_text)
    staging = DatasetStore(root).open_build(spec, text, spec_hash(spec), code_version())
    shards = plan_shards(spec.samples, spec.shard_size)
    args = [(spec, staging, i, r.start, r.stop) for i, r in enumerate(shards)]
    if workers == 1:
        t_start = time.perf_counter()
        n = sum(_bare_shard(*x) for x in args)
    else:
        # What a competent user writes on Linux: a forked pool (Python's default there up to 3.13), created after the
        # imports above, so the workers start with the generator stack already imported, as pairforge's do.
        import multiprocessing as mp

        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with cf.ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            t_start = time.perf_counter()
            n = sum(ex.map(_bare_shard, *zip(*args)))
    t_shards = time.perf_counter()
    staging.publish(card=card)
    t_end = time.perf_counter()
    return {"samples": n, "seconds": t_end - t0, "phases": {"start": t_start - t0, "shards": t_shards - t_start,
                                                             "publish": t_end - t_shards}}


def _bench_prefect_home() -> str:
    """A PREFECT_HOME kept between bench runs for the CLI runs (its database is migrated once, as on a user's
    machine); not the user's own ~/.prefect."""
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pairforge-bench-prefect"
    home.mkdir(parents=True, exist_ok=True)
    return str(home)


def _command_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = _bench_prefect_home()
    env["PYTHONPATH"] = str(REPO)
    return env


def cli_run(argv: list[str], spec_text: str, root: str, env: dict[str, str] | None = None) -> dict:
    """One command, timed from launch to exit; ``{spec}``/``{root}`` in argv are filled in; ``env``: variables
    added to the command's environment."""
    spec_file = Path(root) / "bench-spec.yaml"
    spec_file.write_text(spec_text)
    data_root = str(Path(root) / "data")
    argv = [a.format(spec=spec_file, root=data_root) for a in argv]
    import resource

    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(argv, env={**_command_env(), **(env or {})}, cwd=str(REPO), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU of the command and every process it waited for (pool workers, the API server): less sensitive to other
    # tenants' load than wall time, and what separates the two commands on a quiet machine.
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    n = int(json.loads(p.stdout.strip().splitlines()[-1])["samples"]) if "--bare-run" in argv else \
        int(next(ln for ln in p.stdout.splitlines() if ln.startswith("samples:")).split()[1])
    return {"samples": n, "seconds": seconds, "cpu_seconds": cpu,
            "phases": {"start": 0.0, "shards": seconds, "publish": 0.0}}


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

    from flows import build as fb

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
    ap.add_argument("--example", default="chest_ct_nodules", choices=EXAMPLES,
                    help="the example spec (examples/NAME.yaml) whose work is timed")
    ap.add_argument("--size", type=int, default=512, help="image size in pixels (0: the example's own)")
    ap.add_argument("--shard-size", default="example",
                    help='shards of N samples, "example" (the example spec as shipped: 40 for chest CT, unset for '
                         'surface defects) or "unset" (the default)')
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", default="bare_par,flow_local,flow_processes,dask2,dask1,bare_seq,flow_seq",
                    help="comma list of: bare_seq, bare_par, flow_local (the default runner), flow_processes, flow_threads, "
                         "flow_seq (default runner, 1 worker), dask1, dask2, cli_bare, cli_bare_tuned (the loop with "
                         "flows.allocator.tune(), as pairforge's processes with PAIRFORGE_MALLOC=heap), cli_build (end to end), cli_build_api "
                         "(the same with a Prefect API already running, as scheduled builds under pairforge serve)")
    ap.add_argument("--repeat", type=int, default=1, help="run the whole list this many times; ratios use medians")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--bare-run", nargs=2, metavar=("SPEC", "ROOT"), help=argparse.SUPPRESS)
    ap.add_argument("--tuned", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.bare_run:  # the bare loop as a command of its own (cli_bare): build SPEC into ROOT, print a JSON line
        if a.tuned:  # cli_bare_tuned: the loop with PAIRFORGE_MALLOC=heap's allocator settings, before forking
            from flows import allocator

            os.environ["PAIRFORGE_MALLOC"] = "heap"
            allocator.tune()
        r = bare_loop(Path(a.bare_run[0]).read_text(), a.bare_run[1], a.workers)
        print(json.dumps(r))
        return

    text = bench_spec_text(a.samples, a.size or None, a.shard_size, a.example)
    runs = {}
    for name, (kind, workers) in IN_PROCESS.items():
        n = a.workers if workers is None else workers
        runs[name] = (functools.partial(bare_loop, text, workers=n) if kind is None
                      else functools.partial(flow_run, text, runner=kind, workers=n))
    runs["cli_build"] = lambda root: cli_run([PAIRFORGE, "build", "{spec}", "--root", "{root}", "--workers",
                                              str(a.workers)], text, root)
    # The same command with a Prefect API already running (PREFECT_API_URL): how scheduled builds run under
    # `pairforge serve` or a Prefect server, where no build pays the API server's start. The server is started once,
    # untimed, before the runs (an ephemeral-mode server under the bench's PREFECT_HOME) and stopped after them.
    api_server: dict = {}
    runs["cli_build_api"] = lambda root: cli_run([PAIRFORGE, "build", "{spec}", "--root", "{root}", "--workers",
                                                  str(a.workers)], text, root, {"PREFECT_API_URL": api_server["url"]})
    runs["cli_bare"] = lambda root: cli_run([sys.executable, str(Path(__file__).resolve()), "--bare-run", "{spec}",
                                             "{root}", "--workers", str(a.workers)], text, root)
    runs["cli_bare_tuned"] = lambda root: cli_run([sys.executable, str(Path(__file__).resolve()), "--bare-run",
                                                   "{spec}", "{root}", "--workers", str(a.workers), "--tuned"],
                                                  text, root)
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "processor": platform.processor() or platform.machine(),
                                 "python": platform.python_version()},
                     "example": a.example, "samples": a.samples, "size": a.size, "shard_size": a.shard_size,
                     "workers": a.workers,
                     "command": " ".join(["python"] + sys.argv), "runs": {}}
    names = a.only.split(",")
    unknown = sorted(set(names) - set(runs))
    if unknown:
        ap.error(f"unknown configuration(s) {', '.join(unknown)}; accepted: {', '.join(runs)}")
    if any(n.startswith("cli_") for n in names):
        # Migrate the bench PREFECT_HOME's database once, untimed (a user's ~/.prefect is migrated already).
        warm = tempfile.mkdtemp(prefix="pf-bench-warm-")
        cli_run([PAIRFORGE, "build", "{spec}", "--root", "{root}"], bench_spec_text(4, 512, 4), warm)
        shutil.rmtree(warm, ignore_errors=True)
    if "cli_build_api" in names:
        env = _command_env()
        server = settings.LocalServer(False, False, Path(env["PREFECT_HOME"]) / "bench-api-server.log")
        with _environ(PREFECT_HOME=env["PREFECT_HOME"]):
            api_server.update(server=server.start(), url=server.wait())
    try:
        _run_all(a, names, runs, results)
    finally:
        if "server" in api_server:
            api_server["server"].stop()
    _report(a, results)


@contextlib.contextmanager
def _environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_all(a, names: list[str], runs: dict, results: dict) -> None:
    t0 = time.perf_counter()
    in_process = any(not n.startswith("cli_") for n in names)
    with (settings.prefect_api() if in_process else contextlib.nullcontext("none")) as api:
        results["api_start_seconds"] = time.perf_counter() - t0 if in_process else None
        results["api"] = "ephemeral" if "127.0.0.1" in api else api
        # One untimed tiny build per runner first: importing the runner's stack in this process (distributed and
        # prefect-dask: ~1.5 s), Prefect's first flow and task registrations and cold file caches would otherwise
        # be charged to whichever configuration happens to run first.
        warm_text = bench_spec_text(8, a.size or None, 4, a.example)
        for name in dict.fromkeys(n for n in names if n in IN_PROCESS):
            warm_root = tempfile.mkdtemp(prefix="pf-bench-warm-")
            try:
                kind = IN_PROCESS[name][0]
                if kind is None:
                    bare_loop(warm_text, warm_root, 1)
                else:
                    flow_run(warm_text, warm_root, kind, 1)
            finally:
                shutil.rmtree(warm_root, ignore_errors=True)
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
                cpu = f", CPU {r['cpu_seconds']:.1f} s" if "cpu_seconds" in r else ""
                print(f"{name:15s} {r['samples']:6d} samples {r['seconds']:8.1f} s {r['samples_per_s']:7.2f} "
                      f"samples/s [start {ph['start']:.1f} s, shards {ph['shards']:.1f} s, publish "
                      f"{ph['publish']:.1f} s{cpu}] (load {r['loadavg_1m_before']:.1f} -> {r['loadavg_1m_after']:.1f})",
                      flush=True)


def _report(a, results: dict) -> None:
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
    for num, den, label in RATIOS:
        if num in R and den in R:
            ratios[label] = R[num]["samples_per_s"] / R[den]["samples_per_s"]
    if "dask1" in R and "dask2" in R:
        ratios["dask2 / dask1, shard phase only"] = (R["dask2"]["shard_phase_samples_per_s"]
                                                     / R["dask1"]["shard_phase_samples_per_s"])
    runs_ = results["runs"]
    for build, bare in itertools.product(("cli_build", "cli_build_api"), ("cli_bare", "cli_bare_tuned")):
        if build not in runs_ or bare not in runs_:
            continue
        # Repetition k of each is a pair run back to back: per-pair ratios (build samples/s over the loop's, i.e.
        # loop seconds over build seconds) and their median are less exposed to slow load drifts than the totals.
        pairs = [b["seconds"] / a["seconds"] for a, b in zip(runs_[build], runs_[bare])]
        ratios[f"{build} / {bare}, per pair"] = pairs
        ratios[f"{build} / {bare}, median of pairs"] = float(sorted(pairs)[len(pairs) // 2]) if len(pairs) % 2 \
            else float(sum(sorted(pairs)[len(pairs) // 2 - 1:len(pairs) // 2 + 1]) / 2)
        cpu = [(a.get("cpu_seconds"), b.get("cpu_seconds")) for a, b in zip(runs_[build], runs_[bare])]
        if all(a and b for a, b in cpu):
            ratios[f"CPU s, {build} / {bare}, per pair"] = [a / b for a, b in cpu]
    results["ratios"] = ratios
    if results["api_start_seconds"] is not None:
        print(f"API start {results['api_start_seconds']:.1f} s")
    for k, v in ratios.items():
        print(f"{k:45s} " + (" ".join(f"{x:.3f}" for x in v) if isinstance(v, list) else f"{v:.3f}"))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
