"""The default runner's compute pool (flows/compute.py): plain worker processes that generate and commit shards
and draw the card's plots for Prefect task runs that run as threads of the build process. Real processes, a real
staging area; the Prefect side (lanes as task runs in a real API) is in tests/test_head_start.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SPEC = """\
name: compute-ct
samples: 4
seed: 5
shard_size: 2
image: {size: 128, spacing_mm: [1.2, 1.4]}
findings:
  negatives: 0.25
  mixture: ["8mm solid nodule, right upper lobe"]
"""

# A fresh interpreter, as `pairforge build` is before it forks: the pool's workers commit a shard and draw the card's
# plots without importing Prefect, and the parent has not imported it either.
IN_POOL = """
import json, sys
from flows.compute import ComputePool, activate, run_shard, run_plots
from schemas.spec import load_spec_text, spec_hash
from store import DatasetStore

def prefect_here():
    return "prefect" in sys.modules

text = open(sys.argv[1]).read()
spec = load_spec_text(text)
staging = DatasetStore(sys.argv[2]).open_build(spec, text, spec_hash(spec), "compute-test")
pool = ComputePool(2).start()
activate(pool)
info = [run_shard(spec, staging, 0, 0, 2), run_shard(spec, staging, 1, 2, 4)]
plots = run_plots(staging, spec.domain)
in_workers = sorted({pool.executor.submit(prefect_here).result() for _ in range(4)})
pids = sorted({pool.executor.submit(__import__("os").getpid).result() for _ in range(4)})
activate(None)
pool.close()
print(json.dumps({"shards": [i["shard"] for i in info], "n": [i["n"] for i in info], "plots": sorted(plots),
                  "finished": sorted(staging.finished_shards()), "prefect_in_workers": in_workers,
                  "prefect_here": prefect_here(), "worker_pids": len(pids), "closed": pool.executor is None}))
"""


def test_the_pool_commits_shards_and_draws_plots_without_importing_prefect(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    r = subprocess.run([sys.executable, "-c", IN_POOL, str(spec), str(tmp_path / "root")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["shards"] == [0, 1] and out["n"] == [2, 2] and out["finished"] == [0, 1]
    assert out["plots"], out  # the card's plots, drawn by a worker
    assert out["prefect_in_workers"] == [False] and out["prefect_here"] is False
    assert out["worker_pids"] >= 1 and out["closed"] is True


def test_without_an_active_pool_the_work_runs_in_place(tmp_path):
    """A Dask or Ray worker, a thread runner: no pool in this process, so ``run`` calls the function here; a pool
    inherited from a parent across a fork is never used."""
    from flows import compute

    assert compute.active() is None
    assert compute.run(os.getpid) == os.getpid()
    pool = compute.ComputePool(1)
    pool.executor = object()  # started, as far as active() can tell
    compute._active = (os.getpid() + 1, pool)  # a parent's, inherited
    try:
        assert compute.active() is None and compute.run(os.getpid) == os.getpid()
    finally:
        compute.activate(None)


def test_the_default_runner_hands_its_pool_to_the_flow_runs_copy_and_pickles_without_it():
    from flows import compute
    from flows.runners import make_task_runner, parallelism

    pool = compute.ComputePool(2)
    tr = make_task_runner("local", 2, pool=pool)
    assert type(tr).__name__ == "LanePoolTaskRunner" and parallelism(tr) == 2
    assert tr._max_workers == 3  # two lanes and the card's plots
    assert tr.prestarted_executor() is None  # not started yet
    dup = tr.duplicate()
    assert dup._pool is pool and tr._pool is None and parallelism(dup) == 2
    import cloudpickle  # how Prefect ships a flow and its runner to another process

    clone = cloudpickle.loads(cloudpickle.dumps(dup))
    assert clone._pool is None and clone.lanes == 2


def test_a_bad_pool_start_method_is_one_line_spec_error(monkeypatch):
    from flows.compute import start_method
    from schemas.errors import SpecError

    monkeypatch.setenv("PAIRFORGE_POOL_START", "threads")
    with pytest.raises(SpecError, match="PAIRFORGE_POOL_START='threads'; accepted: fork, spawn, forkserver"):
        start_method()
