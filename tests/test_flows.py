"""The build flow against a real Prefect API (the session's test harness): shards as task runs, retries, resume
from the staging markers, the dataset card, serve deployments."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from conftest import tiny_spec_text
from schemas.errors import SpecError


def data_file_hashes(version_dir: Path) -> dict[str, str]:
    """sha256 of every file of a published version except manifest.json (it holds the clock and the run id)."""
    return {str(p.relative_to(version_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(version_dir.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def _task_runs(flow_run_id: str):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        fr = c.read_flow_run(flow_run_id)
        trs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])))
    return fr, trs


# --------------------------------------------------------------------------------------------- a published build
def test_build_publishes_every_planned_sample_as_one_version(published_tiny):
    from store import DatasetStore

    s = published_tiny["summary"]
    assert (s["name"], s["version"], s["samples"], s["shards"]) == ("tiny-ct", 1, 12, 3)
    assert (s["generated"], s["reused"]) == (3, 0)
    st = DatasetStore(str(published_tiny["root"]))
    m = st.manifest("tiny-ct", 1)
    assert m.counts.samples == 12 and sum(m.counts.splits.values()) == 12
    assert m.run_id == s["flow_run_id"]
    report = st.verify_version("tiny-ct@v1")
    assert report.ok, str(report)
    assert report.files_checked >= 3 * 12


def test_flow_and_task_runs_are_named_for_what_they_do(published_tiny):
    fr, trs = _task_runs(published_tiny["summary"]["flow_run_id"])
    assert fr.name == "build tiny-ct"
    assert fr.state.is_completed()
    names = sorted(t.name for t in trs)
    # One long-lived task per worker (2 by default here), each committing its share of the 3 shards.
    assert [n for n in names if n.startswith("shards")] == ["shards lane 1/2 (2 shards of 3)",
                                                            "shards lane 2/2 (1 shard of 3)"]
    assert "publish tiny-ct v1" in names and "dataset card" in names
    # The card's plots: a task of their own, on the flow's task runner (a worker), while publish writes the rest.
    assert "dataset card: plots" in names
    assert all(t.state.is_completed() for t in trs)
    assert len(trs) == 5  # 2 lanes + card plots + publish + card


def test_task_runs_do_not_grow_with_the_number_of_shards_and_each_shard_is_logged(prefect_api, tmp_path):
    import logging

    from flows import build as fb

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    keep, logger = Keep(), logging.getLogger("prefect.task_runs")
    level = logger.level
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    events = []
    try:
        with fb.reporting_to(events.append):
            s = fb.run_build(tiny_spec_text(name="lanes-ct", samples=6, shard_size=1), root=str(tmp_path),
                             runner="threads", workers=2)
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level)
    assert (s["shards"], s["generated"], s["samples"]) == (6, 6, 6)
    _, trs = _task_runs(s["flow_run_id"])
    lanes = [t for t in trs if t.name.startswith("shards lane")]
    assert len(lanes) == 2 and all(t.state.is_completed() for t in lanes)
    assert sorted(e["shard"] for e in events if e["event"] == "shard") == list(range(6))
    logged = sorted(int(m.group(1)) for msg in keep.messages if (m := re.match(r"shard (\d+)/6: 1 samples", msg)))
    assert logged == [1, 2, 3, 4, 5, 6]


def test_lanes_deal_pending_shards_round_robin():
    from flows.build import plan_lanes

    assert plan_lanes([0, 1, 2, 3, 4], 2) == [[0, 2, 4], [1, 3]]
    assert plan_lanes([3, 7], 4) == [[3], [7]]
    assert plan_lanes([], 2) == []


def test_dataset_card_shows_counts_sizes_and_small_plots(published_tiny):
    vdir = Path(published_tiny["root"]) / "tiny-ct" / "v1"
    readme = (vdir / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| **all** |")]
    assert rows and rows[0].split("|")[2].strip() == "12"
    split_rows = [line.split("|") for line in readme.splitlines() if line.startswith(("| train |", "| val |", "| test |"))
                  and line.count("|") > 4]
    assert sum(int(r[2]) for r in split_rows) == 12
    assert "name: tiny-ct" in readme  # the spec as written
    assert "mean |error|" in readme
    pngs = sorted((vdir / "card").glob("*.png"))
    assert [p.name for p in pngs] == ["finding_sizes.png", "findings_per_region.png", "qc_pass_rates.png",
                                      "sample_grid.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert 2_000 < p.stat().st_size < 100_000, (p.name, p.stat().st_size)
        assert f"card/{p.name}" in readme


def test_card_drawn_across_processes_is_the_card_drawn_in_one(published_tiny, tmp_path):
    """The build draws the card's plots in a worker from the staged index parts while publish writes the browser;
    ``card()`` alone (what a script calls) draws them from samples.parquet: the same bytes. A plots callable that
    fails makes card() draw them itself, the same bytes again."""
    import shutil

    from flows.card import card

    vdir = Path(published_tiny["root"]) / "tiny-ct" / "v1"
    manifest = json.loads((vdir / "manifest.json").read_text())
    drawn = {p: (vdir / p).read_bytes() for p in ["README.md"] + [f"card/{q.name}" for q in (vdir / "card").iterdir()]}
    for plots in (None, lambda: 1 / 0):
        copy = tmp_path / ("serial" if plots is None else "fallback")
        shutil.copytree(vdir, copy)
        shutil.rmtree(copy / "card")
        (copy / "README.md").unlink()
        written = card(str(copy), manifest, plots=plots)
        assert {p for p in written if p.startswith("card/") or p == "README.md"} == set(drawn)
        assert {p: (copy / p).read_bytes() for p in drawn} == drawn


# --------------------------------------------------------------------------------------------- resume and retries
class _Flaky:
    """Wraps the real store: the staging fails the way the test asks, then behaves."""

    def __init__(self, root, fail_write=None, fail_publish=None):
        from store import DatasetStore

        self.st = DatasetStore(root)
        self.fail_write, self.fail_publish = list(fail_write or []), list(fail_publish or [])
        self.write_calls = 0

    def open_build(self, *a):
        outer, real = self, self.st.open_build(*a)

        class Staging:
            def __getattr__(self, k):
                return getattr(real, k)

            def write_shard(self, i, samples, **kw):
                outer.write_calls += 1
                if outer.fail_write:
                    raise outer.fail_write.pop(0)
                return real.write_shard(i, samples, **kw)

            def publish(self, **kw):
                if outer.fail_publish:
                    raise outer.fail_publish.pop(0)
                return real.publish(**kw)

        return Staging()


def test_storage_errors_are_retried_and_the_build_still_publishes(prefect_api, tmp_path, monkeypatch):
    from flows import build as fb

    flaky = _Flaky(str(tmp_path), fail_write=[OSError("disk hiccup")])
    monkeypatch.setattr(fb, "_store", lambda root: flaky)
    s = fb.run_build(tiny_spec_text(name="retry-ct", samples=4, shard_size=4), root=str(tmp_path),
                     runner="threads", workers=1)
    assert s["samples"] == 4 and s["version"] == 1
    assert flaky.write_calls == 2
    _, trs = _task_runs(s["flow_run_id"])
    shard = next(t for t in trs if t.name == "shards lane 1/1 (1 shard of 1)")
    assert shard.run_count == 2 and shard.state.is_completed()


def test_bad_input_inside_a_shard_is_not_retried(prefect_api, tmp_path, monkeypatch):
    from flows import build as fb

    flaky = _Flaky(str(tmp_path), fail_write=[SpecError("shard 0 holds the wrong samples")] * 5)
    monkeypatch.setattr(fb, "_store", lambda root: flaky)
    with pytest.raises(SpecError, match="wrong samples"):
        fb.run_build(tiny_spec_text(name="noretry-ct", samples=4, shard_size=4), root=str(tmp_path),
                     runner="threads", workers=1)
    assert flaky.write_calls == 1
    assert not list(tmp_path.glob("noretry-ct/v*/manifest.json"))


def test_resumed_build_trusts_staging_markers_over_prefect_cache(published_tiny, tmp_path, monkeypatch):
    """Run 1 writes every shard, then dies before publishing. One shard marker is then lost. Run 2 gets Prefect cache
    hits for all three shards, but the markers decide: the lost shard is generated again, and the published files
    are byte-identical to the uninterrupted build's."""
    from flows import build as fb

    spec = published_tiny["spec"].read_text()
    crashing = _Flaky(str(tmp_path), fail_publish=[RuntimeError("killed before publish")])
    monkeypatch.setattr(fb, "_store", lambda root: crashing)
    with pytest.raises(RuntimeError, match="killed before publish"):
        fb.run_build(spec, root=str(tmp_path), runner="threads", workers=2)
    markers = sorted(tmp_path.glob("tiny-ct/_staging/*/parts/shard-*.done.json"))
    assert len(markers) == 3
    markers[1].unlink()

    monkeypatch.undo()
    s = fb.run_build(spec, root=str(tmp_path), runner="threads", workers=2)
    assert (s["reused"], s["generated"], s["version"]) == (2, 1, 1)
    clean = data_file_hashes(Path(published_tiny["root"]) / "tiny-ct" / "v1")
    resumed = data_file_hashes(tmp_path / "tiny-ct" / "v1")
    assert len(clean) > 3 * 12 and resumed == clean


def test_dask_runner_builds_the_same_bytes(published_tiny, tmp_path):
    from flows.build import run_build

    s = run_build(published_tiny["spec"].read_text(), root=str(tmp_path), runner="dask", workers=1)
    assert s["samples"] == 12 and s["generated"] == 3
    assert data_file_hashes(tmp_path / "tiny-ct" / "v1") == \
        data_file_hashes(Path(published_tiny["root"]) / "tiny-ct" / "v1")


def test_transient_error_classification():
    from prefect.states import Completed, Failed

    from flows.build import _is_transient

    def failed(e):
        return Failed(data=e)

    assert _is_transient(None, None, failed(OSError("x")))
    assert _is_transient(None, None, failed(ConnectionError("x")))
    assert not _is_transient(None, None, failed(SpecError("bad")))
    assert not _is_transient(None, None, failed(ZeroDivisionError()))
    assert not _is_transient(None, None, Completed())


# --------------------------------------------------------------------------------------------- schedules
def test_serve_makes_one_deployment_per_spec_with_its_cron(prefect_api, tmp_path):
    from prefect import get_client

    from flows.serve import deployments_for

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(tiny_spec_text(name="nightly-a", schedule="0 2 * * *"))
    b.write_text(tiny_spec_text(name="hourly-b", schedule="15 * * * *"))
    deps = deployments_for([str(a), str(b)], root=str(tmp_path / "root"))
    assert [(name, cron) for _, name, cron in deps] == [("nightly-a", "0 2 * * *"), ("hourly-b", "15 * * * *")]
    ids = [d.apply() for d, _, _ in deps]
    with get_client(sync_client=True) as c:
        for dep_id, (_, name, cron) in zip(ids, deps):
            d = c.read_deployment(dep_id)
            assert d.name == name
            assert [s.schedule.cron for s in d.schedules] == [cron]
            assert d.parameters["spec"].endswith(".yaml") and Path(d.parameters["root"]).is_absolute()


def test_serve_rejects_two_specs_for_one_dataset(tmp_path):
    from flows.serve import deployments_for

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(tiny_spec_text(name="same"))
    b.write_text(tiny_spec_text(name="same", samples=5))
    with pytest.raises(SpecError, match="both define dataset 'same'"):
        deployments_for([str(a), str(b)], root=str(tmp_path / "root"))


def test_code_version_names_the_package_and_a_source_digest():
    from flows.build import code_version

    v = code_version()
    pkg, _, src = v.partition("+src.")
    assert pkg and len(src) == 12 and int(src, 16) >= 0
    assert json.dumps(v)


# --------------------------------------------------------------------------------------------- Ray
def test_ray_runner_builds_and_publishes_the_same_bytes_as_the_local_runner(prefect_api, tmp_path):
    """``--runner ray``: prefect-ray's RayTaskRunner on a local Ray with 2 CPUs runs the shard tasks."""
    from flows import build as fb

    text = tiny_spec_text(name="ray-ct", samples=8, shard_size=4)
    ray_summary = fb.run_build(text, root=str(tmp_path / "ray"), runner="ray", workers=2)
    local_summary = fb.run_build(text, root=str(tmp_path / "local"), runner="threads", workers=2)
    assert (ray_summary["samples"], ray_summary["generated"], ray_summary["reused"]) == (8, 2, 0)
    assert ray_summary["spec_hash"] == local_summary["spec_hash"]
    a = data_file_hashes(tmp_path / "ray" / "ray-ct" / "v1")
    b = data_file_hashes(tmp_path / "local" / "ray-ct" / "v1")
    assert a == b and len(a) == 3 * 8 + 2 + 4 + 5 + 4 * 8  # PNGs, parquet, README, card, browser (+1 detail chunk)
