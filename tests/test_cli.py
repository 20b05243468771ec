"""The ``pairforge`` command line: exit codes, one-line errors, nothing published on bad input, and a build that is
SIGKILLed mid-run and resumed publishing the same bytes as an uninterrupted build."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import tiny_spec_text
from test_flows import data_file_hashes

from flows.cli import app

REPO = Path(__file__).resolve().parent.parent
PAIRFORGE = [sys.executable, "-c", "import sys; from flows.cli import main; sys.argv[0] = 'pairforge'; main()"]


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args))


def published(root: Path) -> list[Path]:
    return sorted(root.glob("*/v*/manifest.json"))


def assert_bad_input(res, *, contains: str) -> None:
    err = res.stderr.strip()
    assert res.exit_code == 2, (res.exit_code, res.output, err)
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and contains in err, err


# --------------------------------------------------------------------------------------------- bad input -> 2
def test_missing_spec_file_exits_2_with_one_line(tmp_path):
    res = run_cli("build", str(tmp_path / "nope.yaml"), "--root", str(tmp_path / "root"))
    assert_bad_input(res, contains="does not exist")
    assert not published(tmp_path)


def test_invalid_yaml_exits_2_naming_the_line(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\nsamples: [1, 2\n")
    res = run_cli("build", str(spec), "--root", str(tmp_path / "root"))
    assert_bad_input(res, contains="invalid YAML at line")
    assert not published(tmp_path)


def test_invalid_spec_exits_2_naming_the_field(tmp_path):
    spec = tmp_path / "invalid.yaml"
    spec.write_text(tiny_spec_text().replace("samples: 12", "samples: -3"))
    res = run_cli("build", str(spec), "--root", str(tmp_path / "root"))
    assert_bad_input(res, contains="samples")
    assert not published(tmp_path)


def test_unknown_generator_exits_2_listing_the_accepted_ones(tmp_path):
    spec = tmp_path / "gen.yaml"
    spec.write_text(tiny_spec_text() + "generator: {name: stable-dreams}\n")
    res = run_cli("build", str(spec), "--root", str(tmp_path / "root"))
    assert_bad_input(res, contains="unknown generator 'stable-dreams'; accepted: ")
    assert "procedural" in res.stderr
    assert not published(tmp_path)


def test_unwritable_root_exits_2(tmp_path, tiny_spec_file):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    res = run_cli("build", str(tiny_spec_file), "--root", str(blocker / "datasets"))
    assert_bad_input(res, contains="dataset root")
    assert blocker.read_text() == "not a folder" and not published(tmp_path)


def test_unknown_runner_exits_2(tmp_path, tiny_spec_file):
    res = run_cli("build", str(tiny_spec_file), "--root", str(tmp_path), "--runner", "slurm")
    assert_bad_input(res, contains="unknown runner 'slurm'")


@pytest.mark.parametrize("cmd", [["show", "no-such-dataset"], ["show", "tiny-ct@v9"], ["pull", "tiny-ct@v9", "DEST"],
                                 ["verify", "tiny-ct@v9"], ["show", "Bad Name@v1"]])
def test_unknown_dataset_or_version_exits_2(published_tiny, tmp_path, cmd):
    cmd = [str(tmp_path / "dest") if c == "DEST" else c for c in cmd]
    res = run_cli(*cmd, "--root", str(published_tiny["root"]))
    assert_bad_input(res, contains="")
    assert not (tmp_path / "dest").exists()


# --------------------------------------------------------------------------------------------- inspection commands
def test_ls_show_pull_and_verify_a_published_version(published_tiny, tmp_path):
    root = str(published_tiny["root"])
    res = run_cli("ls", "--root", root)
    assert res.exit_code == 0 and "tiny-ct" in res.output and "v1" in res.output
    res = run_cli("show", "tiny-ct@v1", "--root", root)
    assert res.exit_code == 0 and "12 samples" in res.output
    res = run_cli("pull", "tiny-ct@v1", str(tmp_path / "copy"), "--root", root)
    assert res.exit_code == 0, res.output
    assert data_file_hashes(tmp_path / "copy" / "tiny-ct" / "v1") == \
        data_file_hashes(Path(root) / "tiny-ct" / "v1")
    res = run_cli("verify", "tiny-ct@v1", "--root", root)
    assert res.exit_code == 0 and "OK" in res.output
    # every unattacked published image (256 px CT, scheme v3) is traced to its version and sample
    images = sorted((Path(root) / "tiny-ct" / "v1" / "images").glob("*.png"))
    assert len(images) == 12
    for image in images:
        res = run_cli("verify", str(image), "--root", root)
        assert res.exit_code == 0, (image.name, res.output)
        assert f"watermark of tiny-ct@v1, sample {image.stem}" in res.output


def test_verify_fails_with_exit_1_on_a_tampered_version(published_tiny, tmp_path):
    res = run_cli("pull", "tiny-ct@v1", str(tmp_path / "copy"), "--root", str(published_tiny["root"]))
    assert res.exit_code == 0
    label = next((tmp_path / "copy" / "tiny-ct" / "v1" / "labels").glob("*.png"))
    label.write_bytes(label.read_bytes()[:-20] + b"\0" * 20)
    res = run_cli("verify", "tiny-ct@v1", "--root", str(tmp_path / "copy"))
    assert res.exit_code == 1 and "problem" in res.output


def test_schema_prints_the_spec_json_schema():
    import json

    res = run_cli("schema")
    assert res.exit_code == 0
    schema = json.loads(res.output)
    assert schema["title"] == "pairforge dataset spec"


def test_parse_prints_json_for_shorthand():
    import json

    pytest.importorskip("flows.preview")
    res = run_cli("parse", "8mm solid nodule, right upper lobe")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)


# --------------------------------------------------------------------------------------------- kill and resume
def _pairforge(*args: str, env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen(PAIRFORGE + list(args), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def test_sigkilled_build_resumes_reusing_shards_and_publishes_identical_bytes(prefect_api, tmp_path):
    spec = tmp_path / "kill.yaml"
    spec.write_text(tiny_spec_text(name="kill-ct", samples=32, shard_size=4))  # 8 shards
    env = dict(os.environ, PREFECT_API_URL=prefect_api, PYTHONPATH=str(REPO))
    root_a, root_b = tmp_path / "killed", tmp_path / "clean"
    args = ("build", str(spec), "--root", str(root_a), "--runner", "processes", "--workers", "1")

    proc = _pairforge(*args, env=env)
    deadline = time.monotonic() + 120
    markers: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        markers = list(root_a.glob("kill-ct/_staging/*/parts/shard-*.done.json"))
        if len(markers) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the build ended before it could be killed: {proc.stdout.read()}"
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker processes, mid-run
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done_at_kill = len(list(root_a.glob("kill-ct/_staging/*/parts/shard-*.done.json")))
    assert 2 <= done_at_kill < 8 and not published(root_a)

    again = _pairforge(*args, env=env)
    out_a, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out_a
    m = re.search(r"shards: (\d+) generated, (\d+) reused \(of 8\)", out_a)
    assert m, out_a
    assert (int(m.group(1)), int(m.group(2))) == (8 - done_at_kill, done_at_kill)
    assert f"published kill-ct@v1 at {root_a}" in out_a

    clean = _pairforge("build", str(spec), "--root", str(root_b), env=env)
    out_b, _ = clean.communicate(timeout=300)
    assert clean.returncode == 0, out_b
    assert "8 generated, 0 reused" in out_b
    code = [json.loads((r / "kill-ct" / "v1" / "manifest.json").read_text())["code"]["code_version"] for r in (root_a, root_b)]
    assert code[0] == code[1], "the source changed while the test ran (code version differs); rerun it"
    a, b = data_file_hashes(root_a / "kill-ct" / "v1"), data_file_hashes(root_b / "kill-ct" / "v1")
    # image, label, instance PNGs; samples.parquet, README.md; 4 card PNGs; the browser (2 pages, 2 scripts, 1 detail
    # chunk, 4 images a sample)
    assert len(a) == 3 * 32 + 2 + 4 + 5 + 4 * 32
    assert sorted(k for k in a if a[k] != b.get(k)) == []


def test_validate_accepts_the_examples_and_rejects_a_bad_spec_with_one_line(tmp_path):
    import subprocess
    import sys

    exe = [sys.executable, "-c", "from flows.cli import main; main()"]
    for spec in ("examples/chest_ct_nodules.yaml", "examples/surface_defects.yaml"):
        r = subprocess.run(exe + ["validate", spec], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.startswith("ok: "), r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsamples: 3\nfindings: {negatives: 0, mixture: ['8mm nodule left middle lobe']}\n")
    r = subprocess.run(exe + ["validate", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "no left middle lobe" in r.stderr and len(r.stderr.strip().splitlines()) == 1
