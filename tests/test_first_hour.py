"""What a new user meets in the first hour: the dataset root set once and used from any folder, ``verify`` exit codes
with one meaning each, no new version for an unchanged spec, progress off a terminal, and the rough edges (typos,
shorthand, preview overwrites, ``show``, the card, MVTec modes)."""
from __future__ import annotations

import json
import os
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from flows.pipeline import make_samples
from schemas.errors import SpecError
from schemas.spec import load_spec_text, spec_hash
from store import DatasetStore

REPO = Path(__file__).resolve().parent.parent
SPEC = """\
name: first-ct
samples: 4
seed: 2
shard_size: 2
image: {size: 256, spacing_mm: [1.2, 1.4]}
findings:
  negatives: 0.0
  mixture: ["12 mm solid nodule, right lower lobe", "10 mm ground-glass nodule, LUL"]
"""


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=timeout)


def publish_direct(root: Path) -> DatasetStore:
    """A published version through the store alone (no Prefect): enough for read-side commands."""
    spec = load_spec_text(SPEC)
    digest = spec_hash(spec)
    samples = {s.index: s for s in make_samples(spec, range(spec.samples), digest=digest)}
    st = DatasetStore(str(root))
    b = st.open_build(spec, SPEC, digest, "first-hour-code")
    for i, r in enumerate(b.shards):
        b.write_shard(i, [samples[j] for j in r])
    b.publish(run_id="r")
    return st


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("root") / "datasets"
    publish_direct(root)
    return root


# ------------------------------------------------------------------------------------------------ the root
def test_root_from_a_project_file_is_used_from_any_subfolder_and_by_datasetstore(published, tmp_path, monkeypatch):
    project = tmp_path / "project"
    deep = project / "a" / "b"
    deep.mkdir(parents=True)
    (project / "pairforge.toml").write_text(f'root = "{os.path.relpath(published, project)}"\n')
    r = cli("ls", cwd=deep)
    assert r.returncode == 0 and "first-ct" in r.stdout, r.stdout + r.stderr
    r = cli("root", cwd=deep)
    assert r.returncode == 0 and str(published) in r.stdout and "pairforge.toml" in r.stdout, r.stdout
    monkeypatch.chdir(deep)
    monkeypatch.delenv("PAIRFORGE_ROOT", raising=False)
    st = DatasetStore()
    assert st.root.path == str(published) and st.versions("first-ct") == [1]


def test_environment_beats_project_file_and_user_config_is_the_fallback(published, tmp_path):
    cfg = tmp_path / "cfg"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"XDG_CONFIG_HOME": str(cfg)}
    r = cli("root", "--set", str(published), cwd=elsewhere, env=env)
    assert r.returncode == 0, r.stderr
    assert (cfg / "pairforge" / "config.toml").read_text().startswith(f'root = "{published}"')
    r = cli("show", "first-ct@v1", cwd=elsewhere, env=env)
    assert r.returncode == 0 and "first-ct@v1" in r.stdout, r.stderr
    r = cli("show", "first-ct@v1", cwd=elsewhere, env={**env, "PAIRFORGE_ROOT": str(tmp_path / "empty")})
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "set by $PAIRFORGE_ROOT" in line and "pairforge root" in line and len(line.splitlines()) == 1, line


def test_default_root_does_not_depend_on_the_current_folder(tmp_path):
    data = tmp_path / "xdg-data"
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    outs = [cli("root", cwd=d, env={"XDG_DATA_HOME": str(data), "XDG_CONFIG_HOME": str(tmp_path / "c")}).stdout
            for d in (a, b)]
    assert outs[0] == outs[1] and str(data / "pairforge" / "datasets") in outs[0] and "default" in outs[0]


# ------------------------------------------------------------------------------------------------ verify
def test_verify_exit_codes_have_one_meaning_from_any_folder(published, tmp_path):
    image = published / "first-ct" / "v1" / "images" / "0000001.png"
    stored = cv2.imread(str(image), cv2.IMREAD_UNCHANGED)
    hu = stored.astype(np.float32) - 1024
    win = np.clip(np.rint((hu + 1350) / 1500 * 255), 0, 255).astype(np.uint8)
    jpeg = tmp_path / "copy.jpg"
    cv2.imwrite(str(jpeg), win, [cv2.IMWRITE_JPEG_QUALITY, 90])
    plain = tmp_path / "plain.png"
    cv2.imwrite(str(plain), np.full((256, 256), 128, np.uint8))
    far = tmp_path / "far"
    far.mkdir()
    root = ["--root", str(published)]

    def verdict(*args, cwd=tmp_path, env=None):
        r = cli("verify", *args, "--json", cwd=cwd, env=env)
        return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else r.stderr)

    code, d = verdict(str(image), *root)
    assert (code, d["verdict"], d["ref"]) == (0, "intact", "first-ct@v1")
    code, d = verdict(str(jpeg), *root)
    assert (code, d["verdict"], d["ref"], d["exit_code"]) == (0, "modified copy", "first-ct@v1", 0)
    # The same copy checked where no root holds its dataset: still identified, still 0.
    code, d = verdict(str(jpeg), cwd=far, env={"XDG_DATA_HOME": str(far / "none")})
    assert (code, d["verdict"], d["identified"]) == (0, "identified", True)
    code, d = verdict(str(plain), *root)
    assert (code, d["verdict"]) == (1, "no mark")
    code, err = verdict(str(tmp_path / "missing.png"), *root)
    assert code == 2
    code, d = verdict("first-ct@v1", *root)
    assert (code, d["verdict"], d["problems"]) == (0, "intact", [])


# ------------------------------------------------------------------------------------------------ show and the card
def test_show_lists_findings_by_kind_and_where_the_card_is(published, tmp_path):
    r = cli("show", "first-ct@v1", "--root", str(published), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "solid:" in r.stdout and "ground_glass:" in r.stdout and " mm" in r.stdout
    assert f"card: {published}/first-ct/v1/README.md" in r.stdout
    r = cli("show", "first-ct@v1", "--root", str(published), "--card", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("# first-ct v1"), r.stdout[:200]


def test_card_size_statistics_cover_every_kind_and_regions_read_as_words():
    from flows.card import plot_sizes, region_counts

    requested = [[{"kind": "scratch", "length_mm": 20.0}], [{"kind": "dent", "diameter_mm": 3.0}],
                 [{"kind": "pit", "diameter_mm": 0.8}]]
    measured = [[{"instance": 1, "length_mm": 19.6, "region": "top_left"}],
                [{"instance": 1, "diameter_mm": 3.1, "location": {"x_mm": 20.0, "y_mm": 15.0}}],
                [{"instance": 1, "diameter_mm": 0.9, "region": "center"}]]
    png, stats = plot_sizes(requested, measured)
    assert png and stats["n"] == 3 and set(stats["by_kind"]) == {"scratch", "dent", "pit"}
    assert abs(stats["by_kind"]["scratch"]["mean_error_mm"] + 0.4) < 1e-9
    assert region_counts(measured) == {"at (20, 15) mm": 1, "center": 1, "top_left": 1}


# ------------------------------------------------------------------------------------------------ specs and shorthand
def test_a_misspelt_required_field_is_named_with_a_suggestion():
    with pytest.raises(SpecError) as e:
        load_spec_text("name: x\nsampels: 3\nfindings: {negatives: 1}\n")
    assert str(e.value) == "<spec>: invalid spec: unknown field 'sampels' (did you mean 'samples'?)"
    with pytest.raises(SpecError) as e:
        load_spec_text("name: x\nsamples: 3\nimage: {siz: 256}\nfindings: {negatives: 1}\n")
    assert "unknown field 'image.siz' (did you mean 'size'?)" in str(e.value)


def test_shorthand_accepts_a_quadrant():
    from schemas.surface_shorthand import parse_defect_text

    d, material = parse_defect_text("2mm scratch top-left quadrant on brushed aluminium")
    assert d.location == "top_left" and material == "brushed_metal"


def test_preview_keeps_earlier_files_unless_overwrite(tmp_path):
    r = cli("preview", "8mm solid nodule RUL", "--out", "pv", "-n", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    first = (tmp_path / "pv" / "0000000_image.png").read_bytes()
    r = cli("preview", "12mm GGN LLL", "--out", "pv", "-n", "1", cwd=tmp_path)
    assert r.returncode == 2 and "--overwrite" in r.stderr and "earlier preview" in r.stderr
    assert (tmp_path / "pv" / "0000000_image.png").read_bytes() == first
    r = cli("preview", "12mm GGN LLL", "--out", "pv", "-n", "1", "--overwrite", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "pv" / "0000000_image.png").read_bytes() != first


def test_mvtec_class_folders_get_normal_modes_and_the_hint_names_the_flag(tmp_path):
    from store.mvtec import export_mvtec

    spec = load_spec_text("name: mv\ndomain: surface\nsamples: 3\nseed: 1\nimage: {size: [256, 256]}\n"
                          "material: brushed_metal\ndefects:\n  negatives: 0.34\n  mixture: ['2mm dent']\n")
    samples = make_samples(spec, range(3), digest=spec_hash(spec))
    old = os.umask(0o022)
    try:
        res = export_mvtec(samples, tmp_path, "plate")
    finally:
        os.umask(old)
    cls = Path(res["class_dir"])
    assert stat.S_IMODE(cls.stat().st_mode) == 0o755
    files = [p for p in cls.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files)
    with pytest.raises(SpecError, match="--overwrite"):
        export_mvtec(samples, tmp_path, "plate")


# ------------------------------------------------------------------------------------------------ build: progress, rebuild
def test_build_off_a_terminal_prints_progress_lines_then_an_unchanged_rebuild_is_up_to_date(tmp_path):
    """The first progress line comes within 5 s of the first shard starting; a second build of the same spec makes
    no new version and exits 0; --json gives machine-readable events."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("samples: 4", "samples: 6"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "ph"),
           "PAIRFORGE_TEST_HOLD": "shard=4"}
    env.pop("PREFECT_API_URL", None)
    p = subprocess.Popen([sys.executable, "-m", "flows.cli", "build", str(spec), "--root", "ds", "--workers", "2"],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[tuple[float, str]] = []
    buf = b""
    staging = tmp_path / "ds" / "first-ct" / "_staging"
    first_shard_start = None
    deadline = time.monotonic() + 600
    while p.poll() is None and time.monotonic() < deadline:
        if first_shard_start is None and list(staging.glob("*/build.json")):
            first_shard_start = time.monotonic()  # staging opened: shards are submitted right after
        r, _, _ = select.select([p.stdout], [], [], 0.1)
        if r:
            chunk = os.read(p.stdout.fileno(), 65536)
            buf += chunk
            while b"\n" in buf:
                ln, buf = buf.split(b"\n", 1)
                lines.append((time.monotonic(), ln.decode()))
    p.wait()
    text = "\n".join(t for _, t in lines)
    assert p.returncode == 0, text
    progress = [(t, ln) for t, ln in lines if "samples," in ln and "ETA" in ln]
    assert first_shard_start is not None and progress, text
    assert progress[0][0] - first_shard_start < 5.0, text  # a status line within 5 s, though no shard ended yet
    assert any(ln.strip().startswith("6/6 samples, 3/3 shards") for _, ln in progress), text
    assert "\x1b[" not in text  # no terminal control codes in a pipe

    env.pop("PAIRFORGE_TEST_HOLD")
    r = subprocess.run([sys.executable, "-m", "flows.cli", "build", str(spec), "--root", "ds", "--json"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    events = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert events == [{"event": "up_to_date", "name": "first-ct", "version": 1,
                       "uri": str(tmp_path / "ds" / "first-ct" / "v1")}]
    assert not (tmp_path / "ds" / "first-ct" / "v2").exists()
    spec.write_text(SPEC.replace("samples: 4", "samples: 5"))
    r = subprocess.run([sys.executable, "-m", "flows.cli", "build", str(spec), "--root", "ds", "--json"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    events = [json.loads(ln) for ln in r.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["changed", "plan"] and "shard" in kinds and kinds[-1] == "published", kinds
    assert events[0]["changes"] == ["samples: 6 -> 5"] and events[0]["since"] == 1
    shard = next(e for e in events if e["event"] == "shard")
    assert {"done", "total", "samples_per_s", "eta_s"} <= set(shard)
    assert events[-1]["version"] == 2
