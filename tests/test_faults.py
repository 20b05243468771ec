"""Storage faults against real parts: a real HTTP fault proxy in front of moto's real S3 server (5xx, throttling,
timeouts, connection resets on reads, writes and lists) and a local fsspec filesystem that raises ENOSPC/EIO.
Builds retry what is transient, stop in one line on a full disk, never publish a version with a missing or corrupt
file (every published version is re-hashed by ``verify_version``), and a rerun finishes every failed build.
"""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

import bench.faults as faults
from schemas.spec import load_spec_text, spec_hash
from store import DatasetStore, NoSpaceError, PublishError, StoreError, verify_version

CODE = "faults-code-1"


def spec_text(name: str = "faulty-ct", seed: int = 1) -> str:
    return faults.small_ct_spec(name, samples=6, seed=seed)


@pytest.fixture(scope="module")
def samples():
    return faults.small_ct_samples(spec_text())


def build(url, opts, samples, text=None, code=CODE):
    """One build through the store API: open (or resume), write missing shards, publish."""
    text = text or spec_text()
    spec = load_spec_text(text)
    st = DatasetStore(url, opts)
    b = st.open_build(spec, text, spec_hash(spec), code)
    for i, r in enumerate(b.shards):
        if not b.has_shard(i):
            b.write_shard(i, [samples[j] for j in r])
    return b.publish(run_id="faults")


@pytest.fixture(scope="module")
def s3():
    with faults.moto_server(bucket="pairforge-faults") as (endpoint, opts):
        yield endpoint, opts


def test_s3_builds_under_injected_faults_publish_only_whole_versions_and_reruns_finish(s3, samples):
    endpoint, _ = s3
    with faults.FaultProxy(endpoint, rate=0.08, seed=7, hang_s=1.5) as proxy:
        opts = faults.s3_options(proxy.endpoint, read_timeout=0.7)
        outcomes = {}
        for k in range(3):
            url = f"s3://pairforge-faults/s3faults{k}"
            try:
                outcomes[url] = build(url, opts, samples, spec_text(seed=k + 1)).version
            except (StoreError, OSError) as e:  # a clean failure: a typed error, no manifest
                outcomes[url] = " ".join(str(e).split())
        assert proxy.stats.total >= 5, proxy.stats  # faults were really injected
        assert {"writes", "reads"} <= set(proxy.stats.by_op), proxy.stats
        proxy.enabled = False
        for k, (url, got) in enumerate(outcomes.items()):
            if got != 1:  # the rerun resumes the failed build and publishes it
                assert DatasetStore(url, opts).versions("faulty-ct") == []  # nothing was half-published
                assert build(url, opts, samples, spec_text(seed=k + 1)).version == 1
            rep = verify_version("faulty-ct@v1", url, opts)
            assert rep.ok and rep.files_checked == 3 * 6 + 2, rep.problems
            assert DatasetStore(url, opts).versions("faulty-ct") == [1]


def test_lost_answers_to_conditional_creates_are_recognised_as_our_own_write(s3, samples):
    """A reset after the server created the manifest/reservation: the retry gets 412, the store reads the object
    back, sees its own bytes and carries on (no 'published by another build', no skipped number)."""
    endpoint, _ = s3
    with faults.FaultProxy(endpoint, rate=0.35, seed=3, faults=("reset_after",), ops=("writes",)) as proxy:
        opts = faults.s3_options(proxy.endpoint)
        url = "s3://pairforge-faults/lostanswers"
        pv = build(url, opts, samples)
        assert pv.version == 1 and proxy.stats.injected.get("reset_after", 0) >= 3
        proxy.enabled = False
        assert DatasetStore(url, opts).versions("faulty-ct") == [1]
        assert verify_version("faulty-ct@v1", url, opts).ok


def test_local_eio_is_retried_and_the_build_publishes_a_whole_version(tmp_path, samples):
    url = f"faultfile://{tmp_path}/root"
    opts = {"rate": 0.1, "seed": 5, "kinds": ("EIO",)}
    pv = build(url, opts, samples)
    st = DatasetStore(url, opts)
    assert st.root.fs.injected.get("EIO", 0) >= 3, st.root.fs.injected
    assert pv.version == 1 and verify_version("faulty-ct@v1", str(tmp_path / "root")).ok


def test_a_full_disk_stops_the_build_in_one_line_naming_the_root_and_a_rerun_finishes(tmp_path, samples):
    url = f"faultfile://{tmp_path}/full"
    text = spec_text()
    spec = load_spec_text(text)
    st = DatasetStore(url, {"rate": 0.0, "seed": 1, "full": False})
    b = st.open_build(spec, text, spec_hash(spec), CODE)
    b.write_shard(0, [samples[j] for j in b.shards[0]])
    st.root.fs.full = True  # the disk fills up
    with pytest.raises(NoSpaceError) as e:
        b.write_shard(1, [samples[j] for j in b.shards[1]])
    msg = str(e.value)
    assert "\n" not in msg and "no space left" in msg and url in msg
    assert st.root.fs.injected["ENOSPC"] == 1  # not retried
    with pytest.raises(NoSpaceError):
        b.publish()
    assert st.versions("faulty-ct") == []  # nothing half-published
    leftovers = [p for p in (tmp_path / "full").rglob("*.tmp-*")]
    assert leftovers == []  # no half-written temp files either
    st.root.fs.full = False  # space freed: publishing alone names the shards still to write
    with pytest.raises(PublishError, match="shards 1, 2"):
        b.publish()
    # the rerun resumes shards 1 and 2 and publishes
    assert build(url, {"rate": 0.0, "seed": 1, "full": False}, samples).version == 1
    assert verify_version("faulty-ct@v1", str(tmp_path / "full")).ok


def test_the_command_line_reports_a_full_disk_in_one_line_and_exits_non_zero(tmp_path, monkeypatch):
    from flows.cli import app

    spec = tmp_path / "s.yaml"
    spec.write_text(spec_text())
    monkeypatch.setenv("PAIRFORGE_STORAGE_OPTIONS", '{"full": true}')
    url = f"faultfile://{tmp_path}/cli-full"
    res = CliRunner().invoke(app, ["build", str(spec), "--root", url])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code != 0 and len(lines) == 1, res.stderr
    assert "no space left" in lines[0] and url in lines[0]
    assert not (tmp_path / "cli-full").exists() or not any((tmp_path / "cli-full").rglob("manifest.json"))


def test_publish_refuses_a_version_whose_sample_file_vanished_and_the_rerun_rewrites_that_shard(tmp_path, samples):
    url = str(tmp_path / "root")
    text = spec_text()
    spec = load_spec_text(text)
    st = DatasetStore(url)
    b = st.open_build(spec, text, spec_hash(spec), CODE)
    for i, r in enumerate(b.shards):
        b.write_shard(i, [samples[j] for j in r])
    lost = tmp_path / "root" / "faulty-ct" / "_staging" / b.key / "data" / "labels" / "0000003.png"
    lost.unlink()
    with pytest.raises(PublishError, match="labels/0000003.png") as e:
        b.publish()
    assert "shards 1 will be written again" in str(e.value)
    assert st.versions("faulty-ct") == []
    assert build(url, None, samples).version == 1  # the rerun regenerates shard 1 only
    assert verify_version("faulty-ct@v1", url).ok
