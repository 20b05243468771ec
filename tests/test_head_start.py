"""``pairforge build`` on the embedded defaults begins its shards while the local Prefect API starts
(flows/head_start.py): real CLI builds, a real local API, the flow run read back from Prefect's own database."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flows import head_start
from schemas.plan import plan_shards
from schemas.spec import load_spec_text, spec_hash
from store import DatasetStore

REPO = Path(__file__).resolve().parent.parent
SPEC = """\
name: head-ct
samples: 8
seed: 11
shard_size: 2
image: {size: 256, spacing_mm: [1.2, 1.4]}
findings:
  negatives: 0.25
  mixture: ["8mm solid nodule, right upper lobe"]
"""
READ_RUN = """
import json, sys
from flows import settings
with settings.prefect_api():
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    with get_client(sync_client=True) as c:
        fr = c.read_flow_run(sys.argv[1])
        trs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])))
        logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fr.id])))
    print(json.dumps({"state": fr.state.type.value, "tasks": sorted(t.name for t in trs),
                      "logs": [lg.message for lg in logs]}))
"""


def _env(tmp: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the embedded API, started by the build
    env.update({"PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp / "prefect-home"), **extra})  # ... or the given one
    return env


def _build(tmp: Path, root: str, **extra: str) -> list[dict]:
    spec = tmp / "spec.yaml"
    spec.write_text(SPEC)
    r = subprocess.run([sys.executable, "-m", "flows.cli", "build", str(spec), "--root", str(tmp / root), "--json",
                        "--workers", "2"], cwd=tmp, env=_env(tmp, **extra), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "INFO" not in r.stderr, r.stderr  # the runs' INFO lines go to the API, not the terminal
    return [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]


def _read_run(tmp: Path, flow_run_id: str, **extra: str) -> dict:
    r = subprocess.run([sys.executable, "-c", READ_RUN, flow_run_id], cwd=tmp, env=_env(tmp, **extra),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _hashes(version_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(version_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(version_dir.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def test_shards_begun_while_the_api_starts_are_this_runs_and_publish_the_same_bytes(tmp_path):
    # The API's start is held 8 s: time enough for the workers to commit every shard before the flow run exists.
    events = _build(tmp_path, "ds", PAIRFORGE_TEST_HOLD="api=8")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "plan" and kinds.count("plan") == 1, kinds
    shards = [e for e in events if e["event"] == "shard"]
    assert sorted(e["shard"] for e in shards) == [0, 1, 2, 3] and not any(e["reused"] for e in shards)
    assert shards[-1]["done"] == 8 and shards[-1]["shards_done"] == 4
    done = events[-1]
    assert done["event"] == "published" and (done["generated"], done["reused"], done["samples"]) == (4, 0, 8)

    run = _read_run(tmp_path, done["flow_run_id"])
    assert run["state"] == "COMPLETED"
    assert any("were begun before this flow run started" in m and "(4 of 4)" in m for m in run["logs"]), run["logs"]
    assert not any(t.startswith("shards lane") for t in run["tasks"]), run["tasks"]  # nothing left for the lanes

    # The same spec with the head start turned off: every published file identical (seeds, order, bytes).
    plain = _build(tmp_path, "plain", PAIRFORGE_HEAD_START="0")
    a, b = _hashes(tmp_path / "ds" / "head-ct" / "v1"), _hashes(tmp_path / "plain" / "head-ct" / "v1")
    assert a == b and len(a) > 30
    # There the lanes did every shard, and each logged it to its task run in the API (the Prefect UI shows them).
    run = _read_run(tmp_path, plain[-1]["flow_run_id"])
    assert [t for t in run["tasks"] if t.startswith("shards lane")] == ["shards lane 1/2 (2 shards of 4)",
                                                                       "shards lane 2/2 (2 shards of 4)"]
    logged = sorted(m.split(":")[0] for m in run["logs"] if m.startswith("shard ") and "2 samples in" in m)
    assert logged == ["shard 1/4", "shard 2/4", "shard 3/4", "shard 4/4"], run["logs"]


def test_the_flow_takes_over_unclaimed_shards_and_no_shard_is_claimed_twice(tmp_path):
    """Jobs claiming from threads while the flow takes over: the claimed and the remaining shards split the plan,
    each claimed shard is committed once, and the head start reports exactly those it committed."""
    spec = load_spec_text(SPEC.replace("samples: 8", "samples: 12"))
    staging = DatasetStore(str(tmp_path / "root")).open_build(spec, SPEC, spec_hash(spec), "head-start-test")
    shards = plan_shards(spec.samples, spec.shard_size)
    events: list[dict] = []
    gate = threading.Event()
    committed: list[int] = []

    from flows.build import commit_shard

    def slow_commit(spec_, staging_, i, start, stop):
        committed.append(i)
        gate.wait(30)  # the first claims hold until the flow has taken over
        return commit_shard(spec_, staging_, i, start, stop)

    with ThreadPoolExecutor(2) as pool:
        head = head_start.HeadStart(pool, 2, spec, staging, shards, slow_commit, emit=events.append)
        assert head_start.take(staging) is head
        while len(committed) < 2:
            threading.Event().wait(0.05)
        claimed = head.take_over()
        gate.set()
        results = [r for f in head.futures for r in f.result()]
        head.close()
    assert claimed == set(committed) and len(claimed) == 2
    assert sorted(r["shard"] for r in results) == sorted(claimed)
    assert staging.finished_shards() == claimed
    assert events[0]["event"] == "plan" and events[0]["finished"] == 0
    # It reports what was committed before the take-over (nothing: the commits were held); the flow the rest.
    assert [e for e in events if e["event"] == "shard"] == [] and head.reported == set()
    assert head_start.take(staging) is None and not head.folder.exists()


def test_lanes_sharing_claims_take_each_remaining_shard_once_and_a_released_claim_is_taken_again(tmp_path):
    folder = tmp_path / "claims"
    folder.mkdir()
    (folder / "0").touch()  # claimed by the head start
    (folder / "stop").touch()  # taken over: the head start claims no more, the lanes still do
    taken: dict[int, list[int]] = {0: [], 1: []}

    def lane(k: int) -> None:
        for i in range(1, 40):
            if head_start.claim_shard(str(folder), i):
                taken[k].append(i)

    threads = [threading.Thread(target=lane, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken[0] + taken[1]) == list(range(1, 40))  # each once, none lost
    assert not head_start.claim_shard(str(folder), 0)
    head_start.release_shard(str(folder), 7)
    assert head_start.claim_shard(str(folder), 7) and not head_start.claim_shard(str(folder), 7)


def test_with_an_api_already_running_the_shards_begin_before_the_flow_run_too(tmp_path, monkeypatch):
    """PREFECT_API_URL names a running API (a Prefect server, `pairforge serve`): no server to wait for, but the
    flow run still waits for Prefect's engine and the run's creation, so the workers begin the shards meanwhile."""
    from flows.settings import LocalServer

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    server = LocalServer(False, False, tmp_path / "server.log").start()
    try:
        url = server.wait()
        # Reaching the API held 8 s: every shard is committed by the head start before the flow run exists.
        events = _build(tmp_path, "ds", PAIRFORGE_TEST_HOLD="api=8", PREFECT_API_URL=url)
        assert [e["event"] for e in events][0] == "plan"
        assert sorted(e["shard"] for e in events if e["event"] == "shard") == [0, 1, 2, 3]
        done = events[-1]
        assert done["event"] == "published" and (done["generated"], done["reused"], done["samples"]) == (4, 0, 8)
        run = _read_run(tmp_path, done["flow_run_id"], PREFECT_API_URL=url)
        assert run["state"] == "COMPLETED"
        assert any("were begun before this flow run started" in m and "(4 of 4)" in m for m in run["logs"])
        assert server.process.poll() is None  # the build leaves an API it did not start running
    finally:
        server.stop()


def test_the_closing_line_counts_the_shards_begun_before_the_flow_run(tmp_path):
    """Every shard is committed while the API's start is held 4 s, so the flow run itself takes well under a second;
    the closing line's time and rate still cover the whole build, from the first shard to the published version."""
    import re

    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    r = subprocess.run([sys.executable, "-m", "flows.cli", "build", str(spec), "--root", str(tmp_path / "ds"),
                        "--workers", "2"], cwd=tmp_path, env=_env(tmp_path, PAIRFORGE_TEST_HOLD="api=4"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"samples: 8 \(0 failed QC\), ([0-9.]+) s, ([0-9.]+) samples/s overall", r.stdout)
    assert m, r.stdout
    seconds, rate = float(m.group(1)), float(m.group(2))
    assert seconds >= 4.0 and abs(rate - 8 / seconds) < 0.1 * rate, r.stdout
