"""The evaluate flow on a real Prefect API: reports written into the evaluation's own folder, the version untouched,
two versions side by side, folder references (DICOM, PNG with labels), and one-line errors from the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from flows.pipeline import make_samples
from tests.test_evaluation import _spec, publish

FAST = {"steps": 4, "patch": 32, "batch": 2, "ks": (3,), "seeds": (0,), "n_synthetic": 3, "worst": 2}


def _tree(path) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-root")
    spec, _ = _spec("x", 12)
    s = make_samples(spec, range(12))
    a = publish(root, "ev", s[:6], n=6)
    from dataclasses import replace

    b = publish(root, "ev", [replace(x, index=i, sample_id=f"{i:07d}") for i, x in enumerate(s[6:])], n=6,
                code="test-eval-2")
    return str(root), a, b


def test_evaluation_writes_report_and_card_beside_an_unchanged_version(two_versions):
    from flows.evaluate import evaluate_versions, latest_evaluation, side_by_side

    root, a, b = two_versions
    before = _tree(os.path.join(root, "ev", "v1"))
    reports = evaluate_versions(a, real="standin:8", against=b, root=root, options=FAST)
    assert _tree(os.path.join(root, "ev", "v1")) == before  # a published version never changes
    ra, rb = reports["evaluated"], reports["against"]
    assert ra["folder"].startswith(os.path.join(root, "_evaluations", "ev", "v1"))
    assert rb["folder"].startswith(os.path.join(root, "_evaluations", "ev", "v2"))
    files = set(os.listdir(ra["folder"]))
    assert {"evaluation.json", "README.md", "realism_histograms.png", "realism_nps.png", "learned_check_dice.png",
            "utility_curve.png"} <= files
    assert sum(f.startswith("worst_") for f in files) == 2
    saved = json.load(open(os.path.join(ra["folder"], "evaluation.json")))
    assert saved["label_fidelity"]["passed"] and saved["label_fidelity"]["findings"] >= 6
    assert saved["reference"]["kind"] == "standin" and "NOT real data" in saved["reference"]["note"]
    assert set(saved["realism"]["wasserstein1"]) >= {"lung", "fat", "soft_tissue"}
    assert "NOT comparable" in saved["realism"]["features"]["source"]
    arms = {(r["arm"], r["k"]) for r in saved["utility"]["summary"]}
    assert arms == {("synthetic", 0), ("real", 3), ("real+synthetic", 3)}
    assert "skipped" in saved["memorisation"]
    card = open(os.path.join(ra["folder"], "README.md")).read()
    assert "### Label fidelity" in card and "### Utility" in card and "stand-in" in card
    assert latest_evaluation(root, a) == saved
    rows = dict((m, (x, y)) for m, x, y in side_by_side(ra, rb))
    assert rows["label fidelity"] == ("passed", "passed") and "W1 lung" in rows


def test_evaluate_reads_a_dicom_and_labelled_png_folder(two_versions, tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    from flows.evaluate import evaluate_versions
    from flows.reference import load_folder

    root, a, _ = two_versions
    folder = tmp_path / "ref"
    folder.mkdir()
    src = get_testdata_file("CT_small.dcm")
    pydicom.dcmread(src).save_as(folder / "ct_small.dcm")
    ref = load_folder(str(folder), "chest_ct")
    assert len(ref) == 1 and not ref.labelled and ref.spacings[0] == pytest.approx(0.661468, abs=1e-4)
    assert -1100 < float(np.median(ref.images[0])) < 200  # HU after rescale
    rep = evaluate_versions(a, real=str(folder), root=root, options={**FAST, "utility": False})["evaluated"]
    assert rep["realism"]["classes_by"].startswith("intensity intervals")
    assert rep["realism"]["features"]["fid"] is None  # one reference image: no covariance
    assert "learned_check" not in rep

    # A labelled PNG folder: pairforge's 16-bit HU encoding plus label files and a spacing file.
    spec, _ = _spec("x", 3)
    pngs = tmp_path / "png"
    pngs.mkdir()
    for smp in make_samples(spec, range(3)):
        cv2.imwrite(str(pngs / f"{smp.sample_id}.png"), (np.rint(smp.image) + 1024).astype(np.uint16))
        cv2.imwrite(str(pngs / f"{smp.sample_id}_label.png"), smp.label)
    (pngs / "spacing.json").write_text(json.dumps({"default": 1.3}))
    got = load_folder(str(pngs), "chest_ct")
    assert got.labelled and len(got) == 3 and got.labels[0].max() > 12


def test_evaluate_runs_as_a_prefect_flow_with_each_step_a_task_run(prefect_api, two_versions):
    from prefect.client.orchestration import get_client

    from flows.evaluate import evaluate_dataset

    root, a, _ = two_versions
    state = evaluate_dataset(a, real="standin:6", root=root, options={**FAST, "utility": False}, return_state=True)
    assert state.is_completed()
    rep = state.result()["evaluated"]
    assert os.path.exists(os.path.join(rep["folder"], "evaluation.json"))

    import asyncio

    async def task_names():
        async with get_client() as c:
            runs = await c.read_task_runs()
            return {r.name.split("-")[0] for r in runs if r.flow_run_id == state.state_details.flow_run_id}

    names = asyncio.run(task_names())
    assert {"label", "train", "realism", "write"} <= names, names


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_evaluate_cli_bad_input_is_one_line_with_exit_2(two_versions, tmp_path):
    root, a, _ = two_versions
    r = _cli("evaluate", "ev@v9", "--root", root)
    assert r.returncode == 2 and "no published version 9" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli("evaluate", a, "--root", root, "--ks", "ten")
    assert r.returncode == 2 and "--ks" in r.stderr
    r = _cli("evaluate", a, "--root", root, "--real", str(tmp_path / "nowhere"), "--no-utility", "--steps", "1")
    assert r.returncode == 2 and "neither a folder" in r.stderr
