"""The garbage collector paused while pairforge's own processes import (flows/gcpause.py): off during the imports,
on again after them with what they made frozen, in the ``pairforge build`` process, its compute pool's workers and
the local API server; never touched in a caller's process. Real processes and a real Prefect server app."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _fresh_python(code: str, tmp_path: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_imports_pauses_the_collector_then_freezes_what_exists_and_restores_its_state():
    from flows import gcpause

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        with gcpause.imports():
            assert not gc.isenabled()
            kept = [[i] for i in range(1000)]  # objects made while paused
        assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(kept)
        gc.disable()  # a caller that runs with the collector off keeps it off
        with gcpause.imports():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()  # back to the oldest generation: collectable again in this test process


WORKERS = """
import gc, json
from flows import gcpause
from flows.compute import ComputePool

gcpause.pause()  # as `pairforge build` is while it imports and forks its pool
pool = ComputePool(2, preload=("json",)).start()
on = sorted({pool.executor.submit(gc.isenabled).result() for _ in range(4)})
frozen = min(pool.executor.submit(gc.get_freeze_count).result() for _ in range(4))
pool.close()
print(json.dumps({"workers_on": on, "workers_frozen": frozen, "parent_on": gc.isenabled()}))
"""


def test_pool_workers_forked_from_a_paused_build_collect_and_skip_what_they_inherited(tmp_path):
    out = _fresh_python(WORKERS, tmp_path)
    assert out["workers_on"] == [True]  # each worker turns its collector on after its imports
    assert out["workers_frozen"] > 10_000  # the parent's modules, inherited across the fork, out of its reach
    assert out["parent_on"] is False  # the parent resumes when its own imports are done, not the pool


BUILD = """
import atexit, gc, json, sys
seen = {}
def at_exit():
    seen.update(on=gc.isenabled(), frozen=gc.get_freeze_count())
    print(json.dumps(seen))
atexit.register(at_exit)
from flows.cli import main
sys.argv = ["pairforge", "build", sys.argv[1], "--root", sys.argv[2], "--workers", "1", "-q"]
main()
"""

SPEC = """\
name: gc-ct
samples: 2
seed: 3
shard_size: 2
image: {size: 96, spacing_mm: [1.2, 1.4]}
findings:
  negatives: 0.5
  mixture: ["8mm solid nodule, right upper lobe"]
"""


def test_the_build_process_runs_its_flow_with_the_collector_on_and_its_imports_frozen(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    out = _fresh_python(BUILD, tmp_path, str(spec), str(tmp_path / "ds"))
    assert out["on"] is True and out["frozen"] > 100_000  # Prefect's and the pipeline's imports
    assert (tmp_path / "ds" / "gc-ct" / "v1").is_dir()


def test_a_build_run_through_the_cli_in_a_callers_process_leaves_its_collector_alone(monkeypatch):
    """CliRunner (a test, a script embedding the CLI): the process is not pairforge's, so no pause and no freeze."""
    from flows import cli

    assert cli._OWN_PROCESS is False
    seen = []
    monkeypatch.setattr(cli, "_build_checked", lambda *a, **k: seen.append((gc.isenabled(), gc.get_freeze_count())))
    frozen = gc.get_freeze_count()
    cli._build("spec.yaml", None, "local", None, None, False, True, False, False)
    assert seen == [(True, frozen)] and gc.isenabled() and gc.get_freeze_count() == frozen


SERVER = """
import asyncio, gc, json
from flows.server_app import create_app

app = create_app(ephemeral=True, final=True)
state = {"after_create": gc.isenabled()}

async def main():
    async with app.router.lifespan_context(app):
        state["after_startup"] = gc.isenabled()
        state["frozen"] = gc.get_freeze_count()
        await asyncio.sleep(2)  # the services started (stopping one that has not yet started fails in Prefect)
    state["after_shutdown"] = gc.isenabled()

asyncio.run(main())
print(json.dumps(state))
"""


def test_the_api_server_starts_with_the_collector_paused_and_serves_with_it_on(tmp_path):
    out = _fresh_python(SERVER, tmp_path)
    assert out["after_create"] is False  # the app's imports are done; its lifespan (migrations, blocks) is not
    assert out["after_startup"] is True and out["frozen"] > 100_000
    assert out["after_shutdown"] is True
