"""Domains are plug-ins: a third domain registered from a test module alone (tests/toy_domain.py) validates,
previews, builds through Prefect, shows, verifies and loads with no edit to any project file; shared code names
no domain; versions published before image codecs were recorded still load and verify; the example specs
publish the same bytes as before the registry (up to the new codec record)."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tests.toy_domain as toy
from schemas.domain import get_domain, known_domains
from schemas.errors import SpecError

REPO = Path(__file__).resolve().parent.parent
PAIRFORGE = [sys.executable, "-c", "import sys; from flows.cli import main; sys.argv[0] = 'pairforge'; main()"]

TOY_SPEC = """\
name: toy-thermal
domain: toy_thermal
samples: 6
seed: 4
shard_size: 3
image: {size: 64, spacing_mm: 1.0}
findings:
  negatives: 0.2
  mixture:
    - "hot spot 8 mm +12 C"
    - {text: "hot spot 5 mm", weight: 2}
"""


@pytest.fixture(autouse=True)
def _toy_registered():
    toy.register()
    yield


# ------------------------------------------------------------------------------------------- registration
def test_a_domain_registered_at_runtime_is_known_everywhere():
    assert "toy_thermal" in known_domains() and {"chest_ct", "surface"} <= set(known_domains())
    from schemas.classes import class_table
    from schemas.spec import spec_json_schema

    assert class_table("toy_thermal").names[1] == "hot_spot"
    assert "toy_thermal" in json.dumps(spec_json_schema())


def test_unknown_domain_is_one_line_listing_the_known_ones():
    from schemas.spec import validate_spec

    with pytest.raises(SpecError) as e:
        validate_spec({"name": "x", "domain": "weld_xray", "samples": 1})
    assert "weld_xray" in str(e.value) and "toy_thermal" in str(e.value) and "chest_ct" in str(e.value)
    with pytest.raises(KeyError):
        get_domain("weld_xray")


def test_a_plugin_module_that_cannot_be_imported_is_one_line_naming_it(monkeypatch):
    from schemas.domain import load_plugins

    monkeypatch.setenv("PAIRFORGE_PLUGINS", "tests.toy_domain, no_such_plugin_module")
    with pytest.raises(SpecError, match="PAIRFORGE_PLUGINS: cannot import 'no_such_plugin_module'"):
        load_plugins(reload=True)
    monkeypatch.setenv("PAIRFORGE_PLUGINS", "tests.toy_domain")
    load_plugins(reload=True)
    assert "toy_thermal" in known_domains()


def test_toy_shorthand_phrase_is_parsed_and_bad_phrases_name_what_is_accepted():
    from schemas.spec import load_spec_text

    spec = load_spec_text(TOY_SPEC)
    assert spec.findings.mixture[0].diameter_mm == (8.0, 8.0) and spec.findings.mixture[0].excess_c == (12.0, 12.0)
    assert spec.findings.mixture[1].weight == 2
    with pytest.raises(SpecError, match="hot spot D mm"):
        load_spec_text(TOY_SPEC.replace("hot spot 5 mm", "warm blob"))


def test_shared_planner_draws_weights_negatives_and_splits_for_the_toy_domain():
    from schemas.plan import plan_sample
    from schemas.spec import load_spec_text

    spec = load_spec_text(TOY_SPEC.replace("samples: 6", "samples: 2000"))
    reqs = [plan_sample(spec, i) for i in range(2000)]
    neg = np.mean([r.params["negative"] for r in reqs])
    entries = [r.findings[0]["mixture_entry"] for r in reqs if r.findings]
    assert abs(neg - 0.2) < 0.03
    assert abs(np.mean(np.array(entries) == 1) - 2 / 3) < 0.04  # weight 2 vs 1
    assert abs(np.mean([r.split == "train" for r in reqs]) - 0.8) < 0.03
    assert all(r.domain == "toy_thermal" and r.size == (64, 64) for r in reqs[:5])


# ------------------------------------------------------------------------------------------- the float codec
def test_float16_codec_round_trips_temperatures_within_half_a_step():
    from store.codecs import codec_for_domain, codec_from_record

    c = codec_for_domain("toy_thermal")
    img = np.random.default_rng(0).uniform(-20, 120, (32, 32)).astype(np.float32)
    stored = c.encode(img)
    assert stored.dtype == np.uint16
    back = codec_from_record(c.record()).read(c.to_bytes(stored))
    assert back.dtype == np.float32 and np.abs(back - img).max() <= 0.005 + 1e-6
    assert c.record()["name"] == "float16" and json.loads(c.record()["params_json"]) == {"offset": -50.0, "scale": 0.01}


# ------------------------------------------------------------------------------------------- preview
def test_preview_of_toy_shorthand_writes_temperatures_and_the_domain_overlay(tmp_path):
    from flows.preview import run_preview
    from store.codecs import codec_from_record

    files = run_preview("hot spot 6 mm +12 C", tmp_path, n=2, seed=1)
    assert len(files) == 8
    meta = json.loads((tmp_path / "0000000.json").read_text())
    assert meta["domain"] == "toy_thermal" and meta["image_codec"]["name"] == "float16"
    rec = {"name": "float16", "version": 1, "params_json": json.dumps(meta["image_codec"]["params"])}
    temps = codec_from_record(rec).read((tmp_path / "0000000_image.png").read_bytes())
    assert 17 < float(np.median(temps)) < 23 and temps.max() > 28  # ambient ~20 °C, a +12 °C spot
    assert abs(meta["measured"][0]["equivalent_diameter_mm"] - 6.0) < 1.0
    from store.codec import decode_png

    overlay = decode_png((tmp_path / "0000000_overlay.png").read_bytes())
    assert overlay.ndim == 3 and overlay.shape[2] == 3  # the toy domain's colour-mapped hook ran


# ------------------------------------------------------------------------------------------- build -> load
def test_toy_domain_builds_through_prefect_then_shows_verifies_and_loads(prefect_api, tmp_path, monkeypatch):
    monkeypatch.setenv("PAIRFORGE_PLUGINS", "tests.toy_domain")  # worker processes register it too
    from flows.build import run_build
    from flows.pipeline import make_samples
    from schemas.spec import load_spec_text
    from store import DatasetStore

    summary = run_build(TOY_SPEC, root=str(tmp_path))
    assert summary["samples"] == 6 and summary["shards"] == 2
    st = DatasetStore(str(tmp_path))
    ref = f"toy-thermal@v{summary['version']}"
    assert "toy_thermal" in st.show(ref)
    report = st.verify_version(ref)
    assert report.ok, str(report)
    m = st.manifest("toy-thermal")
    assert m.codecs["image"]["name"] == "float16" and m.codecs["image"]["params"] == {"scale": 0.01, "offset": -50.0}
    assert m.class_table == {"0": "background", "1": "hot_spot"}
    idx = st.index(ref).to_pylist()
    assert {r["image_codec"]["name"] for r in idx} == {"float16"}
    ds = st.load(ref)
    spec = load_spec_text(TOY_SPEC)
    made = make_samples(spec, range(6))
    for got, want in zip(ds, made):
        assert got["image"].dtype == np.float32
        # Quantisation (0.005 °C) plus the watermark (at most 4 steps = 0.04 °C) off the spots.
        assert np.abs(got["image"] - want.image).max() <= 0.045 + 1e-5
        assert np.array_equal(got["label"], want.label)
        assert [f["equivalent_diameter_mm"] for f in got["measured"]] == \
            [f["equivalent_diameter_mm"] for f in want.measured]
    assert (tmp_path / "toy-thermal" / f"v{summary['version']}" / "card" / "sample_grid.png").is_file()


def test_cli_honours_pairforge_plugins_for_a_third_domain(prefect_api, tmp_path):
    spec = tmp_path / "toy.yaml"
    spec.write_text(TOY_SPEC.replace("samples: 6", "samples: 3"))
    env = dict(os.environ, PAIRFORGE_PLUGINS="tests.toy_domain", PYTHONPATH=str(REPO), PREFECT_API_URL=prefect_api)
    root = str(tmp_path / "root")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(PAIRFORGE + list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    r = cli("validate", str(spec))
    assert r.returncode == 0, r.stderr
    r = cli("parse", "hot spot 4 mm +9 C")
    assert r.returncode == 0 and json.loads(r.stdout)["domain"] == "toy_thermal", r.stderr
    r = cli("preview", str(spec), "--out", str(tmp_path / "pv"), "-n", "1")
    assert r.returncode == 0 and (tmp_path / "pv" / "0000000_overlay.png").is_file(), r.stderr
    r = cli("build", str(spec), "--root", root)
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("show", "toy-thermal@v1", "--root", root)
    assert r.returncode == 0 and "toy_thermal" in r.stdout, r.stderr
    r = cli("verify", "toy-thermal@v1", "--root", root)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    # Export through a built-in format (nnU-Net raw: float images as NIfTI), read back with nibabel.
    r = cli("export", "nnunet", "toy-thermal@v1", str(tmp_path / "nn"), "--root", root)
    assert r.returncode == 0, r.stdout + r.stderr
    import nibabel as nib
    from store import DatasetStore

    ds = DatasetStore(root).load("toy-thermal@v1")
    images = sorted((tmp_path / "nn").rglob("*_0000.nii.gz"))
    assert len(images) == len(ds) == 3
    exported = sorted(float(np.asarray(nib.load(str(f)).dataobj, np.float32).sum()) for f in images)
    published = sorted(float(np.asarray(s["image"], np.float32).sum()) for s in ds)
    assert np.allclose(exported, published, rtol=1e-5), (exported, published)
    # Without the plug-in the same spec is bad input: one line, exit 2, naming the known domains.
    env.pop("PAIRFORGE_PLUGINS")
    r = cli("validate", str(spec))
    assert r.returncode == 2 and "toy_thermal" in r.stderr and "chest_ct" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------- shared code
SHARED = ["schemas/spec.py", "schemas/plan.py", "schemas/classes.py", "generators/base.py", "generators/controlnet.py",
          "annotators/__init__.py", *[str(p.relative_to(REPO)) for p in sorted((REPO / "flows").glob("*.py"))],
          *[str(p.relative_to(REPO)) for p in sorted((REPO / "store").glob("*.py"))]]


def _domain_literals(path: Path) -> list[str]:
    names = {"chest_ct", "surface", "chest_ct_volume"}
    names |= {f"{layer}.{n}" for layer in ("schemas", "generators", "annotators", "store") for n in names}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.strip() in names:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    return found


def test_shared_code_names_no_built_in_domain():
    hits = [h for f in SHARED for h in _domain_literals(REPO / f)]
    assert not hits, "shared code compares or names a domain: " + "; ".join(hits)


def test_the_domain_literal_check_catches_a_domain_name():
    bad = REPO / "tests" / "_literal_probe.py"
    bad.write_text('def f(d):\n    return d == "surface"\n')
    try:
        assert _domain_literals(bad) == ["tests/_literal_probe.py:2: 'surface'"]
    finally:
        bad.unlink()


# ------------------------------------------------------------------------------------------- old versions
FIXTURE = REPO / "tests" / "fixtures" / "v1"


def test_versions_published_before_codecs_load_and_verify(tmp_path):
    import shutil

    from store import DatasetStore

    root = tmp_path / "root"
    shutil.copytree(FIXTURE, root)  # never write into the fixture
    expected = json.loads((REPO / "tests" / "fixtures" / "v1_expected.json").read_text())
    st = DatasetStore(str(root))
    for ref, want in expected.items():
        assert st.manifest(ref.split("@")[0]).codecs is None  # the old format: only "encodings"
        report = st.verify_version(ref)
        assert report.ok and report.files_checked == 14, str(report)
        got = list(st.load(ref))
        assert [g["sample_id"] for g in got] == [w["sample_id"] for w in want]
        for g, w in zip(got, want):
            assert str(g["image"].dtype) == w["dtype"] and list(g["image"].shape) == w["shape"]
            assert float(np.asarray(g["image"], np.float64).sum()) == w["sum"]
            assert float(g["image"].min()) == w["min"] and int(g["label"].sum()) == w["label_sum"]


def test_an_encoding_nobody_mapped_is_refused_not_guessed():
    from store.codecs import codec_from_record
    from store.errors import StoreError

    with pytest.raises(StoreError, match="not known"):
        codec_from_record(None, "uint12 png: mystery")


def test_example_specs_publish_the_bytes_they_did_before_the_registry():
    """Small builds of examples/*.yaml (procedural ones) against sha256 recorded by bench/example_bytes.py (first by
    the code before the domain registry; re-recorded when the PNG writer moved to libdeflate, docs/store.md, and when the chest-CT renderer was made faster, docs/chest_ct.md). Every sample file (image, label and instance PNG) is identical. The index,
    manifest and card differ by what was changed on purpose since: the image codec record, exact stratified splits
    (a split column and split counts) and the card's per-kind size table and tightly cropped figures (see
    docs/CONTRACTS.md, "Splits")."""
    sys.path.insert(0, str(REPO))
    from bench import example_bytes as eb

    want = json.loads((REPO / "tests" / "fixtures" / "example_bytes.json").read_text())
    if want["environment"] != eb.environment():
        pytest.skip(f"PNG/Parquet libraries differ from the recording ({want['environment']} vs {eb.environment()})")
    got = eb.build_hashes(want["samples"])
    for ex, w in want["examples"].items():
        g = got[ex]
        assert g["spec_hash"] == w["spec_hash"], ex
        differing = sorted(f for f in w["files"] if w["files"][f] != g["files"].get(f))
        samples = [f for f in w["files"] if f.split("/")[0] in ("images", "labels", "instances")]
        assert len(samples) == 18 and not set(samples) & set(differing), (ex, differing)
        assert set(differing) <= {"manifest.json", "samples.parquet", "README.md", "manifest.json#manifest_without_codec",
                                  "samples.parquet#rows_without_codec"} | {f for f in w["files"] if f.startswith("card/")}
        assert len(w["files"]) == len(g["files"]) == 27
