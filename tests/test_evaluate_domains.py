"""`pairforge evaluate` beyond chest-CT slices against the stand-in: evaluation profiles come from each domain's
description (surface, the toy domain, chest-CT volumes), a feature extractor given on disk makes FID/KID
comparable (pickles and mismatched weights refused in one line), and the real CT slice CT_small with inserted
nodules serves as a labelled reference with a real background."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from flows.pipeline import make_samples
from schemas.spec import load_spec_text, spec_hash
from store import DatasetStore
from tests.test_evaluation import _spec, publish

FAST = {"steps": 4, "patch": 32, "batch": 2, "ks": (3,), "seeds": (0,), "n_synthetic": 3, "worst": 2}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def publish_text(root, text: str, samples, code: str = "test-eval") -> str:
    spec = load_spec_text(text)
    b = DatasetStore(str(root)).open_build(spec, text, spec_hash(spec), code)
    for i, r in enumerate(b.shards):
        b.write_shard(i, [samples[j] for j in r])
    return f"{spec.name}@v{b.publish(run_id='test').version}"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO, **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def ct_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev-dom")
    spec, _ = _spec("x", 6)
    return str(root), publish(root, "ev", make_samples(spec, range(6)), n=6)


# ------------------------------------------------------------------------------------------- domain profiles
def test_evaluation_profiles_are_named_by_each_domains_description():
    import tests.toy_domain as toy
    from annotators.evaluation import profile_for
    from schemas.domain import all_domains, get_domain
    from schemas.errors import SpecError

    toy.register()
    assert {d.name for d in all_domains() if d.evaluation_module} >= {"chest_ct", "chest_ct_volume", "surface",
                                                                     "toy_thermal"}
    assert profile_for("surface").units == "grey level" and profile_for("surface").finding_group == "defect"
    assert profile_for("toy_thermal").units == "°C"
    assert profile_for("chest_ct_volume").volumetric and not profile_for("chest_ct").volumetric
    # Volume class 25 is the stomach, chest-CT slice class 25 the computed right lung: each profile has its own.
    assert 25 in profile_for("chest_ct").surround_ids and 25 not in profile_for("chest_ct_volume").surround_ids
    assert set(get_domain("chest_ct").reference_sets) == {"standin", "ct_small_inserted"}
    from schemas.domain import register_domain, unregister_domain

    register_domain(replace(get_domain("toy_thermal"), name="toy_noeval", evaluation_module=None))
    try:
        with pytest.raises(SpecError) as e:
            profile_for("toy_noeval")
        assert "no evaluation profile" in str(e.value) and "surface" in str(e.value)
    finally:
        unregister_domain("toy_noeval")
    # Shared evaluation code names no domain.
    for f in ("annotators/evaluation.py", "flows/evaluate.py", "flows/reference.py"):
        src = open(os.path.join(REPO, f)).read()
        assert '"chest_ct"' not in src and '"surface"' not in src and '"lung"' not in src, f


SURFACE = """
name: {name}
domain: surface
samples: 6
seed: {seed}
material: brushed_metal
field_of_view_mm: [30, 40]
image: {{size: 128}}
shard_size: 6
defects:
  negatives: 0
  mixture: ["stain 4-8 mm", "dent 3-5 mm", "hole 2-3 mm"]
"""


def test_evaluate_cli_on_a_surface_version_against_another(prefect_api, tmp_path):
    root = tmp_path / "root"
    texts = [SURFACE.format(name="surf", seed=s) for s in (1, 2)]
    a = publish_text(root, texts[0], make_samples(load_spec_text(texts[0]), range(6)))
    b = publish_text(root, texts[1], make_samples(load_spec_text(texts[1]), range(6)), code="test-eval-2")
    r = _cli("evaluate", a, "--real", b, "--root", str(root), "--steps", "3", "--ks", "2", "--seeds", "1",
             "--n-synthetic", "2", "--device", "cpu", env={"PREFECT_API_URL": prefect_api, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    folder = r.stdout.strip().splitlines()[-1].split("written:")[-1].strip()
    rep = json.load(open(os.path.join(folder, "evaluation.json")))
    lf = rep["label_fidelity"]
    assert lf["findings"] >= 6 and lf["cnr"]["median"] > 3  # the defects show on the published grey images
    assert {t["class"] for t in lf["tissue"]} >= {"good"} and all(t["passed"] for t in lf["tissue"])
    assert rep["realism"]["units"] == "grey level" and "good" in rep["realism"]["wasserstein1"]
    assert rep["realism"]["wasserstein1"]["good"] < 60  # same material, another seed
    assert list(rep["learned_check"]["dice_per_class"]) == ["defect"]
    assert {x["arm"] for x in rep["utility"]["summary"]} == {"synthetic", "real", "real+synthetic"}


def test_toy_domain_version_is_evaluated_with_its_own_profile(tmp_path):
    import tests.toy_domain as toy
    from flows.evaluate import evaluate_versions

    toy.register()
    text = ("name: toy-ev\ndomain: toy_thermal\nsamples: 6\nseed: {s}\nshard_size: 6\n"
            "findings: {{negatives: 0, mixture: ['hot spot 8 mm +12 C']}}\n")
    root = tmp_path / "root"
    a = publish_text(root, text.format(s=1), make_samples(load_spec_text(text.format(s=1)), range(6)))
    b = publish_text(root, text.format(s=2), make_samples(load_spec_text(text.format(s=2)), range(6)),
                     code="test-eval-2")
    rep = evaluate_versions(a, real=b, root=str(root), options={**FAST, "utility": False})["evaluated"]
    lf = rep["label_fidelity"]
    assert lf["passed"] and lf["findings"] == 6 and lf["cnr"]["median"] > 20  # +12 °C over 0.2 °C noise
    med = {t["class"]: t["median"] for t in lf["tissue"]}
    assert 18 <= med["background"] <= 22 and med["hot_spot"] >= 25
    assert rep["realism"]["units"] == "°C" and set(rep["realism"]["wasserstein1"]) == {"background", "hot_spot"}
    assert rep["realism"]["nps"]["noise_std_version"] == pytest.approx(0.2, rel=0.35)


# ------------------------------------------------------------------------------------------- feature extractor
def _write_extractor(path, **kwargs):
    import monai.networks.nets as nets
    import torch
    from safetensors.torch import save_file

    args = {"spatial_dims": 2, "in_channels": 1, "out_channels": 3, "init_features": 8, "growth_rate": 4,
            "block_config": [2, 2], "bn_size": 2, **kwargs}
    torch.manual_seed(0)
    net = nets.DenseNet(**args)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    cfg = {"network": "DenseNet", "kwargs": {k: v for k, v in args.items()}, "module": "features", "size": 64,
           "window": [-600, 1500]}
    (path.parent / (path.name + ".json")).write_text(json.dumps(cfg))
    return net


def test_features_from_disk_give_comparable_fid_kid_and_pickles_or_mismatches_are_refused(ct_root, tmp_path):
    import torch

    from flows.evaluate import evaluate_versions

    root, a = ct_root
    w = tmp_path / "feat.safetensors"
    net = _write_extractor(w)
    n_feat = net.features(torch.zeros(1, 1, 64, 64)).shape[1]
    rep = evaluate_versions(a, real="standin:6", root=root,
                            options={**FAST, "utility": False, "features": str(w)})["evaluated"]
    f = rep["realism"]["features"]
    assert f["comparable"] is True and "comparable with FID/KID computed with the same extractor" in f["comparability"]
    assert f["dims"] == n_feat and f["extractor"]["network"] == "DenseNet" and len(f["extractor"]["sha256"]) == 64
    assert f["fid"] is not None and f["fid"] > 0 and np.isfinite(f["kid"])
    card = open(os.path.join(rep["folder"], "README.md")).read()
    assert "DenseNet" in card and "comparable with FID/KID" in card
    plain = evaluate_versions(a, real="standin:6", root=root, options={**FAST, "utility": False})["evaluated"]
    g = plain["realism"]["features"]
    assert g["comparable"] is False and g["comparability"].startswith("NOT comparable") and g["fid"] is not None

    # A pickle (torch.save) beside a valid config: refused in one line, exit 2, before anything runs.
    pk = tmp_path / "feat.pt"
    torch.save(net.state_dict(), pk)
    (tmp_path / "feat.pt.json").write_text((tmp_path / "feat.safetensors.json").read_text())
    r = _cli("evaluate", a, "--root", root, "--real", "standin:4", "--features", str(pk), "--no-utility")
    assert r.returncode == 2 and "safetensors weights only" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # Weights of another configuration than the one the config names: one line naming what does not fit.
    other = tmp_path / "other.safetensors"
    _write_extractor(other, growth_rate=6)
    (tmp_path / "other.safetensors.json").write_text((tmp_path / "feat.safetensors.json").read_text())
    r = _cli("evaluate", a, "--root", root, "--real", "standin:4", "--features", str(other), "--no-utility")
    assert r.returncode == 2 and "does not fit DenseNet" in r.stderr and "of another shape" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------- CT_small reference
def test_ct_small_with_inserted_nodules_is_a_labelled_real_background_reference(ct_root):
    from flows.evaluate import evaluate_versions
    from flows.reference import load_reference

    root, a = ct_root
    ref = load_reference("ct_small_inserted:6", "chest_ct", 256)
    assert len(ref) == 6 and ref.labelled and ref.kind == "ct_small_inserted"
    assert "REAL background" in ref.note and "SYNTHETIC findings" in ref.note
    assert all(im.shape == (128, 128) for im in ref.images) and ref.spacings[0] == pytest.approx(0.6615, abs=1e-3)
    # Same real slice under every sample: away from the findings the pixels agree.
    away = ref.instances[0] == 0
    away &= ref.instances[1] == 0
    assert np.median(np.abs(ref.images[0] - ref.images[1])[away]) == 0
    assert all((inst > 0).sum() > 10 for inst in ref.instances)
    rep = evaluate_versions(a, real="ct_small_inserted:6", root=root, options=FAST)["evaluated"]
    assert rep["reference"]["kind"] == "ct_small_inserted" and rep["reference"]["labelled"]
    rl = rep["realism"]
    assert rl["classes_by"] == "labels" and {"lung", "nodule"} <= set(rl["wasserstein1"])
    assert rl["nps"]["rois_reference"] > 0  # uniform soft tissue found by HU inside the real body
    assert rep["learned_check"]["reference_test"] is not None
    assert {x["arm"] for x in rep["utility"]["summary"]} == {"synthetic", "real", "real+synthetic"}
    card = open(os.path.join(rep["folder"], "README.md")).read()
    assert "REAL background with SYNTHETIC findings" in card


# ------------------------------------------------------------------------------------------- volumes
VOLUME = """
name: {name}
domain: chest_ct_volume
samples: 2
seed: 3
shard_size: 2
volume: {{size: [16, 96, 96], spacing_mm: [5.0, 3.6, 3.6]}}
findings:
  negatives: 0
  mixture: ["solid nodule 16 mm RLL"]
"""


def test_evaluate_a_volume_version_measures_findings_in_3d(tmp_path):
    from flows.evaluate import evaluate_versions

    root = tmp_path / "root"
    text = VOLUME.format(name="vol-ev")
    samples = make_samples(load_spec_text(text), range(2))
    a = publish_text(root, text, samples)
    # The same volumes with every nodule painted over by the lung around it: the labels promise what is not there.
    erased = []
    for s in samples:
        img = s.image.copy()
        m = s.instance > 0
        from scipy import ndimage

        ring = ndimage.binary_dilation(m, iterations=2) & ~m & np.isin(s.label, (12, 13, 14, 15, 16))
        img[m] = np.random.default_rng(0).choice(img[ring], int(m.sum()))
        erased.append(replace(s, image=img))
    b = publish_text(root, text, erased, code="test-eval-2")
    reports = evaluate_versions(a, real=b, against=b, root=str(root), options={**FAST, "utility": False})
    good, bad = reports["evaluated"]["label_fidelity"], reports["against"]["label_fidelity"]
    assert good["measured_in"].startswith("3-D") and bad["measured_in"].startswith("3-D")
    n_inst = sum(len(np.unique(s.instance)) - 1 for s in samples)
    assert good["findings"] == bad["findings"] == n_inst >= 2  # one entry per 3-D finding, not per slice
    assert good["passed"] and good["cnr"]["median"] > 5
    assert not bad["passed"] and bad["failing"] == n_inst and bad["cnr"]["median"] < 2
    f = good["failing_findings"] or []
    assert not f
    # Realism and tissue reports over voxels (slices of the volumes), in HU.
    rl = reports["evaluated"]["realism"]
    assert rl["units"] == "HU" and {"lung", "soft_tissue", "bone"} <= set(rl["wasserstein1"])
    assert reports["evaluated"]["reference"]["samples"] == 32  # 2 volumes x 16 axial slices
    assert {t["class"] for t in good["tissue"]} >= {"lung", "muscle"}
