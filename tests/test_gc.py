"""`pairforge gc`: the staging area of a killed build (no heartbeat, older than the threshold) is listed, kept on a
dry run and removed with --yes; a live build's staging (fresh heartbeat) is never listed; published versions and
reservations are untouched. Local folder and moto's real S3 server; a real process killed with SIGKILL.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

import bench.faults as faults
from schemas.spec import load_spec_text, spec_hash
from store import DatasetStore, verify_version
from store.gc import collect, parse_duration
from store.errors import StoreError


MOTO_BUCKET = "pairforge-gc"

KILLED = r"""
import pickle, sys, time
sys.path.insert(0, {repo!r})
from schemas.spec import load_spec_text, spec_hash
from store import DatasetStore
text, samples, url, opts = pickle.load(open(sys.argv[1], "rb"))
spec = load_spec_text(text)
b = DatasetStore(url, opts).open_build(spec, text, spec_hash(spec), "gc-code")
hb = b.heartbeat(0.2)
b.write_shard(0, [samples[j] for j in b.shards[0]])
print(b.key, flush=True)
time.sleep(600)  # killed here, mid-build
"""


@pytest.fixture(scope="module")
def samples():
    return faults.small_ct_samples(faults.small_ct_spec("gc-ct"))


def _killed_build(url, opts, samples, tmp_path, name="dead-ct") -> str:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(repo=repo))
    arg = tmp_path / f"{name}.pkl"
    arg.write_bytes(pickle.dumps((faults.small_ct_spec(name), samples, url, opts)))
    p = subprocess.Popen([sys.executable, str(script), str(arg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    key = p.stdout.readline().strip()
    assert key, p.stderr.read()
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    return key


def test_a_killed_builds_staging_is_listed_then_removed_and_a_live_one_is_left_alone(store_root, samples, tmp_path):
    url, opts = store_root
    st = DatasetStore(url, opts)
    dead_key = _killed_build(url, opts, samples, tmp_path)
    # a published version and a live build (fresh heartbeat) beside the dead one
    text = faults.small_ct_spec("live-ct")
    spec = load_spec_text(text)
    pub_text = faults.small_ct_spec("pub-ct")
    pub_spec = load_spec_text(pub_text)
    done = st.open_build(pub_spec, pub_text, spec_hash(pub_spec), "gc-code")
    for i, r in enumerate(done.shards):
        done.write_shard(i, [samples[j] for j in r])
    done.publish()
    live = st.open_build(spec, text, spec_hash(spec), "gc-code")
    with live.heartbeat(0.2):
        live.write_shard(0, [samples[j] for j in live.shards[0]])
        time.sleep(2.5)  # the dead build's last heartbeat is now over 2 s old; the live one beats every 0.2 s
        dry = collect(st.root, older_than_s=2.0)
        staging = [g for g in dry.dead if g.kind == "staging"]
        assert [(g.name, g.shards_done) for g in staging] == [("dead-ct", 1)]
        assert staging[0].path.rstrip("/").endswith(dead_key) and not any(g.removed for g in dry.dead)
        if not st.root.local:  # the killed build wrote its shard straight into v1/ (no manifest): listed too
            assert [g.name for g in dry.dead if g.kind == "unpublished version"] == ["dead-ct"]
        assert any(p.rstrip("/").endswith(live.key) for p in dry.live)
        assert st.root.exists(st.root.join("dead-ct", "_staging", dead_key, "build.json"))  # dry run: kept

        rep = collect(st.root, older_than_s=2.0, remove=True)
        assert rep.removed == len(dry.dead) and all(g.removed for g in rep.dead)
        assert not st.root.exists(st.root.join("dead-ct", "_staging", dead_key, "build.json"))
        assert st.root.listdir_names(st.root.join("dead-ct", "_staging")) == []
        assert set(st.root.listdir_names(st.root.join("dead-ct"))) <= {"_staging", "_versions"}  # no v1/ left
        assert st.root.listdir_names(st.root.join("dead-ct", "_versions")) == ["v1.json"]  # the number stays taken
        assert st.root.exists(st.root.join("live-ct", "_staging", live.key, "build.json"))  # live: untouched
    for i, r in enumerate(live.shards):
        if not live.has_shard(i):
            live.write_shard(i, [samples[j] for j in r])
    assert live.publish().version == 1
    assert verify_version("pub-ct@v1", url, opts).ok and verify_version("live-ct@v1", url, opts).ok


def test_the_threshold_protects_recent_builds_and_the_cli_is_a_dry_run_without_yes(tmp_path, samples):
    from flows.cli import app

    url = str(tmp_path / "root")
    _killed_build(url, None, samples, tmp_path, name="cli-ct")
    runner = CliRunner()
    res = runner.invoke(app, ["gc", "--root", url])  # default threshold 1 h: the fresh corpse is not old enough
    assert res.exit_code == 0 and "no dead builds older than 1h" in res.output, res.output
    time.sleep(1.2)
    res = runner.invoke(app, ["gc", "--root", url, "--older-than", "1s"])
    assert res.exit_code == 0 and "dead staging of cli-ct v1" in res.output and "dry run" in res.output, res.output
    assert (tmp_path / "root" / "cli-ct" / "_staging").exists() and any((tmp_path / "root" / "cli-ct" /
                                                                         "_staging").iterdir())
    res = runner.invoke(app, ["gc", "--root", url, "--older-than", "1s", "--yes"])
    assert res.exit_code == 0 and "removed 1 of 1" in res.output, res.output
    assert list((tmp_path / "root" / "cli-ct" / "_staging").iterdir()) == []
    res = runner.invoke(app, ["gc", "--root", url, "--older-than", "soon"])
    assert res.exit_code == 2 and "not a duration" in res.stderr


def test_durations_parse_and_bad_ones_are_refused():
    assert [parse_duration(t) for t in ("90s", "30m", "1h", "2d", "15")] == [90, 1800, 3600, 172800, 15]
    for bad in ("", "-1h", "nan", "1y", "inf"):
        with pytest.raises(StoreError, match="not a duration"):
            parse_duration(bad)
