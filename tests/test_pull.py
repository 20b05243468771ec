"""Pull from any root to any destination (store/transfer.py, `pairforge pull`), and `ls` / `show` on remote roots,
against a real S3-compatible server (moto's server mode on 127.0.0.1, reached through s3fs): S3 -> local -> S3 with
a real `pairforge pull` process SIGKILLed half way each time and resumed, ending byte-identical; a corrupted source
object named in one line with nothing published; local -> local and S3 -> S3.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from store import DatasetStore, IntegrityError, StoreError, pull
from test_store import build, ct_samples, s3_server  # noqa: F401  (fixtures: the samples and the moto server)

REPO = Path(__file__).resolve().parent.parent
PAIRFORGE = [sys.executable, "-c", "import sys; from flows.cli import main; sys.argv[0] = 'pairforge'; main()"]
_COUNTER = iter(range(10_000))


def _s3_url(tag: str) -> str:
    return f"s3://pairforge-test/{tag}{next(_COUNTER)}"


def _env(opts: dict, tmp_path: Path) -> dict:
    """The CLI's environment: this checkout, the moto endpoint through $PAIRFORGE_STORAGE_OPTIONS."""
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
                PAIRFORGE_STORAGE_OPTIONS=json.dumps({"s3": opts}), XDG_CONFIG_HOME=str(tmp_path / "xdg"))


def _hashes(st: DatasetStore, name: str, version: int) -> dict[str, str]:
    """sha256 of every object under the version, read back from the root itself."""
    base = st.root.version_dir(name, version)
    st.root.refresh()
    out = {}
    for p in st.root.fs.find(base):
        p = p if st.root.local else st.root.fs._strip_protocol(p)
        out[p.split(f"/v{version}/", 1)[1]] = hashlib.sha256(st.root.read_bytes(p)).hexdigest()
    return out


def _count_staged(st: DatasetStore, prefix: str) -> int:
    st.root.refresh()
    try:
        return sum(1 for p in st.root.fs.find(prefix) if ".tmp-" not in p)
    except FileNotFoundError:
        return 0


def _kill_half_way(cmd: list[str], env: dict, cwd: Path, count, total: int, at: int) -> int:
    """Run ``cmd``; SIGKILL it once ``count()`` reaches ``at`` files; return how many files were staged then."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if count() >= at:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    o, e = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"pull was not killed half way (rc {proc.returncode}): {o} {e}"
    n = count()
    assert at <= n < total, (n, total)
    return n


def test_pull_s3_to_local_to_s3_killed_and_resumed_ends_byte_identical(s3_server, ct_samples, tmp_path):
    opts = s3_server
    src_url = _s3_url("pull-src")
    src, _, _ = build(src_url, opts, ct_samples)
    want = _hashes(src, "store-ct", 1)
    total = len(want) - 1  # files besides the manifest
    assert total >= 18 and "manifest.json" in want
    env = _env(opts, tmp_path)

    # ---- S3 -> local, killed after 3 files (images sort first: about 0.4 MB each, 2 s each at 200 kB/s), resumed
    local = tmp_path / "local"
    stage = lambda: next(iter(sorted((local / "store-ct" / "_pull").glob("v1-*"))), local / "none")  # noqa: E731
    staged = _kill_half_way(
        PAIRFORGE + ["pull", "store-ct@v1", str(local), "--root", src_url, "--workers", "1", "--limit-rate", "200k"],
        env, tmp_path, lambda: sum(1 for p in stage().rglob("*") if p.is_file() and ".tmp-" not in p.name),
        total, at=3)
    assert not (local / "store-ct" / "v1").exists()
    assert DatasetStore(str(local)).versions("store-ct") == []  # nothing published by the killed pull

    (stage() / "images" / "0000005.png.tmp-1-2").write_bytes(b"half a file")  # what a kill mid-write leaves
    events = []
    res = src.pull_to("store-ct@v1", str(local), progress=events.append)
    assert res.reused_files == staged and res.files == total
    assert sum(1 for e in events if e["event"] == "file" and not e["reused"]) == total - staged
    assert events[0]["event"] == "plan" and events[0]["bytes"] == res.bytes
    lst = DatasetStore(str(local))
    assert _hashes(lst, "store-ct", 1) == want
    assert not (local / "store-ct" / "_pull").exists()
    assert lst.verify_version("store-ct@v1").ok

    # ---- local -> S3, killed the same way, resumed
    dst_url = _s3_url("pull-dst")
    dst = DatasetStore(dst_url, opts)
    staged = _kill_half_way(
        PAIRFORGE + ["pull", "store-ct@v1", dst_url, "--root", str(local), "--workers", "1", "--limit-rate", "200k"],
        env, tmp_path, lambda: _count_staged(dst, dst.root.version_dir("store-ct", 1)), total, at=3)
    assert dst.versions("store-ct") == []  # the half-copied prefix has no manifest: invisible
    res = lst.pull_to("store-ct@v1", dst_url, opts)
    assert res.reused_files == staged and res.uri == f"{dst_url}/store-ct/v1"
    assert dst.versions("store-ct") == [1]
    assert _hashes(dst, "store-ct", 1) == want  # manifest and every file byte-identical to the source
    assert dst.verify_version("store-ct@v1").ok
    assert dst.load("store-ct@v1")[0]["label"].shape == (512, 512)

    # ---- again: nothing copied, the copy verified
    again = lst.pull_to("store-ct@v1", dst_url, opts)
    assert again.already and again.files == total


def test_corrupted_source_object_is_named_and_nothing_is_published(s3_server, ct_samples, tmp_path):
    opts = s3_server
    src_url = _s3_url("pull-bad")
    src, _, _ = build(src_url, opts, ct_samples)
    target = src.root.join("store-ct", "v1", "labels", "0000003.png")
    good = src.root.read_bytes(target)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01
    src.root.fs.pipe_file(target, bytes(bad))

    r = subprocess.run(PAIRFORGE + ["pull", "store-ct@v1", str(tmp_path / "out"), "--root", src_url], cwd=tmp_path,
                       env=_env(opts, tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "labels/0000003.png" in lines[0] and "sha256 mismatch" in lines[0], r.stderr
    assert DatasetStore(str(tmp_path / "out")).versions("store-ct") == []
    assert not (tmp_path / "out" / "store-ct" / "v1").exists()

    dst_url = _s3_url("pull-bad-dst")
    with pytest.raises(IntegrityError, match=r"labels/0000003\.png: sha256 mismatch") as e:
        pull("store-ct@v1", dst_url, src_url, opts, opts)
    assert e.value.paths == ["labels/0000003.png"] and "\n" not in str(e.value)
    dst = DatasetStore(dst_url, opts)
    assert dst.versions("store-ct") == []
    assert not dst.root.exists(dst.root.join("store-ct", "v1", "labels", "0000003.png"))
    copied = _count_staged(dst, dst.root.version_dir("store-ct", 1))
    assert copied >= 6  # images/ and instances/ sort before labels/: copied, invisible, kept for the resume

    # the source repaired, the same pull completes, keeping what it had copied
    src.root.fs.pipe_file(target, good)
    res = src.pull_to("store-ct@v1", dst_url, opts, workers=2)
    assert dst.versions("store-ct") == [1] and dst.verify_version("store-ct@v1").ok
    assert res.reused_files == copied
    assert _hashes(dst, "store-ct", 1) == _hashes(src, "store-ct", 1)


def test_pull_local_to_local_and_s3_to_s3_and_refusals(s3_server, ct_samples, tmp_path):
    opts = s3_server
    a = tmp_path / "a"
    st, _, _ = build(str(a), None, ct_samples)
    want = _hashes(st, "store-ct", 1)
    res = st.pull_to("store-ct", str(tmp_path / "b"), workers=3)  # the latest version
    assert res.ref == "store-ct@v1" and res.reused_files == 0 and not res.already
    assert _hashes(DatasetStore(str(tmp_path / "b")), "store-ct", 1) == want

    s3a, s3b = _s3_url("s3a"), _s3_url("s3b")
    pull("store-ct@v1", s3a, str(a), None, opts)
    out = pull("store-ct@v1", s3b, s3a, opts)  # same protocol: the source's storage options serve the destination
    assert out == f"{s3b}/store-ct/v1"
    assert _hashes(DatasetStore(s3b, opts), "store-ct", 1) == want

    # the command off a terminal: no bar, one summary line; --json: the events and the result, one object a line
    env = _env(opts, tmp_path)
    r = subprocess.run(PAIRFORGE + ["pull", "store-ct@v1", str(tmp_path / "d"), "--root", str(a)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("pulled store-ct@v1 to ") and "every sha256 checked" in r.stdout
    assert len(r.stdout.strip().splitlines()) == 1 and "━" not in r.stdout + r.stderr
    r = subprocess.run(PAIRFORGE + ["pull", "store-ct@v1", str(tmp_path / "e"), "--root", str(a), "--json"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    evs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["event"] for e in evs] == ["plan"] + ["file"] * res.files + ["done", "result"]
    assert evs[-1]["files"] == res.files and evs[-1]["bytes"] == sum(e["bytes"] for e in evs if e["event"] == "file")
    assert _hashes(DatasetStore(str(tmp_path / "e")), "store-ct", 1) == want

    # a destination whose v1 is reserved by a build refuses in one line
    other = tmp_path / "c"
    (other / "store-ct" / "_versions").mkdir(parents=True)
    (other / "store-ct" / "_versions" / "v1.json").write_text('{"key": "x", "digest": "d", "code_version": "c"}')
    with pytest.raises(StoreError, match="v1 of 'store-ct' is taken .* by a build"):
        st.pull("store-ct@v1", str(other))
    with pytest.raises(StoreError, match="no published version 4"):
        st.pull("store-ct@v4", str(other))
    r = subprocess.run(PAIRFORGE + ["pull", "store-ct@v1", str(other), "--root", str(a), "--limit-rate", "fast"],
                       cwd=tmp_path, env=_env(opts, tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "rate limit 'fast'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_ls_and_show_read_a_remote_root_with_storage_options_from_the_user_config(s3_server, ct_samples, tmp_path):
    opts = s3_server
    url = _s3_url("ls")
    build(url, opts, ct_samples)
    xdg = tmp_path / "xdg"
    (xdg / "pairforge").mkdir(parents=True)
    endpoint = opts["client_kwargs"]["endpoint_url"]
    (xdg / "pairforge" / "config.toml").write_text(
        "[storage.s3]\nkey = \"testing\"\nsecret = \"testing\"\nuse_listings_cache = false\n"
        f"client_kwargs = {{endpoint_url = \"{endpoint}\", region_name = \"us-east-1\"}}\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), XDG_CONFIG_HOME=str(xdg), COLUMNS="200")
    env.pop("PAIRFORGE_STORAGE_OPTIONS", None)

    def cli(*args):
        return subprocess.run(PAIRFORGE + list(args), cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)

    r = cli("ls", "--root", url)
    assert r.returncode == 0, r.stderr
    assert "store-ct" in r.stdout and "v1" in r.stdout and " 6 " in r.stdout
    r = cli("show", "store-ct@v1", "--root", url)
    assert r.returncode == 0, r.stderr
    assert "store-ct@v1" in r.stdout and "6 samples" in r.stdout and f"{url}/store-ct/v1/README.md" in r.stdout
    r = cli("show", "store-ct", "--root", url, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["counts"]["samples"] == 6
    r = cli("show", "store-ct@v2", "--root", url)
    assert r.returncode == 2 and "published versions: v1" in r.stderr
    r = cli("ls", "--root", "s3://no-such-bucket-pf/x")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
