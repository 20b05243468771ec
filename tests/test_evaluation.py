"""Evaluation metrics on published versions: label fidelity catches images that do not show their labels,
memorisation catches planted copies of training images, realism distances rank references correctly. Versions are
published through the real store (watermarked, rounded) and read back through its verified reader."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from annotators import evaluation as ev
from flows.evaluate import EvalOptions, label_fidelity, memorisation, realism
from flows.pipeline import make_samples
from flows.reference import ImageSet, load_standin, load_version
from generators.ct_render import render_ct
from schemas.classes import LOBES
from schemas.spec import load_spec_text, spec_hash
from store import DatasetStore

SPEC = """
name: {name}
domain: chest_ct
samples: {n}
seed: 5
image: {{size: 256, spacing_mm: [1.2, 1.4]}}
slice_level: [0.3, 0.85]
findings:
  negatives: 0
  mixture:
    - "10 mm solid nodule, any lobe"
    - "12 mm ground-glass nodule, any lobe"
    - {{kind: part_solid, diameter_mm: [10, 14], location: any}}
shard_size: {n}
"""
N = 10
PROFILE = ev.profile_for("chest_ct")


def _spec(name: str, n: int = N):
    text = SPEC.format(name=name, n=n)
    return load_spec_text(text), text


def publish(root, name: str, samples, n: int = N, code: str = "test-eval") -> str:
    spec, text = _spec(name, n)
    st = DatasetStore(str(root))
    b = st.open_build(spec, text, spec_hash(spec), code)
    for i, r in enumerate(b.shards):
        b.write_shard(i, [samples[j] for j in r])
    pv = b.publish(run_id="test")
    return f"{name}@v{pv.version}"


@pytest.fixture(scope="module")
def samples():
    spec, _ = _spec("x", 2 * N)
    return make_samples(spec, range(2 * N))


def _erase(label: np.ndarray, instance: np.ndarray, k: int) -> np.ndarray:
    """The label with finding ``k`` painted over by the lobe around it."""
    out = label.copy()
    m = instance == k
    ring = (cv2.dilate(m.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0) & ~m
    lobes = out[ring][np.isin(out[ring], list(LOBES.values()))]
    out[m] = np.bincount(lobes).argmax() if len(lobes) else LOBES["RLL"]
    return out


def broken(sample, how: str):
    """The sample re-rendered by a broken backend: findings erased, or drawn 10 px to the right of their label."""
    lab = sample.label
    draw = lab.copy()
    for k in np.unique(sample.instance)[1:]:
        m = sample.instance == k
        cls = lab[m]
        draw = _erase(draw, sample.instance, k)
        if how == "shifted":
            ys, xs = np.nonzero(m)
            draw[ys, np.clip(xs + 10, 0, lab.shape[1] - 1)] = cls
    img = render_ct(draw, None, sample.spacing_mm, sample.params["render"])
    from dataclasses import replace

    return replace(sample, image=img)


def test_label_fidelity_passes_a_correct_version_and_flags_erased_and_shifted_findings(tmp_path, samples):
    good = samples[:N]
    refs = {"correct": publish(tmp_path, "fid-ok", good),
            "erased": publish(tmp_path, "fid-erased", [broken(s, "erased") for s in good]),
            "shifted": publish(tmp_path, "fid-shifted", [broken(s, "shifted") for s in good])}
    rep = {k: label_fidelity(load_version(r, str(tmp_path)), PROFILE, EvalOptions()) for k, r in refs.items()}
    assert rep["correct"]["findings"] >= N
    assert rep["correct"]["passed"] and rep["correct"]["failing"] == 0, rep["correct"]["failing_findings"][:3]
    assert rep["correct"]["cnr"]["p05"] >= 3
    for k in ("erased", "shifted"):
        assert not rep[k]["passed"]
        assert rep[k]["failing_share"] >= 0.9, (k, rep[k]["failing_share"])
    # A shifted finding is found where it was drawn: 10 px to the right.
    strong = [f["offset_px"] for f in rep["shifted"]["failing_findings"] if abs(f["ncc_best"]) >= 0.6]
    at_ten = [abs(x - 10) <= 1.5 and abs(y) <= 1.5 for x, y in strong]
    assert len(strong) >= 3 and np.mean(at_ten) >= 0.8, strong
    assert all(t["passed"] for t in rep["erased"]["tissue"])  # tissues fine: only the findings are wrong


def test_memorisation_flags_planted_copies_of_training_images_and_nothing_else(tmp_path, samples):
    train = load_standin("chest_ct", 24, 256, seed=21)
    held = load_standin("chest_ct", 24, 256, seed=22)
    own = list(samples[:N])
    # The version's images are its own renders, except three that are copies of training images.
    from dataclasses import replace

    planted = {2: 0, 5: 7, 8: 13}
    for i, j in planted.items():
        own[i] = replace(own[i], image=train.images[j].copy(), label=train.labels[j], instance=train.instances[j],
                         spacing_mm=train.spacings[j])
    version = load_version(publish(tmp_path, "memo", own), str(tmp_path))
    rep, pairs = memorisation(version, train, held, PROFILE)
    flagged = {f["sample"] for f in rep["pixel"]["flagged"]}
    assert flagged == {version.ids[i] for i in planted}
    assert {f["train_match"] for f in rep["pixel"]["flagged"]} == {train.ids[j] for j in planted.values()}
    assert not rep["passed"] and rep["flagged"] == 3 and len(pairs) == 3
    clean = load_version(publish(tmp_path, "memo-clean", samples[:N]), str(tmp_path))
    rep2, _ = memorisation(clean, train, held, PROFILE)
    assert rep2["passed"] and rep2["flagged"] == 0


def test_realism_distances_rank_same_generator_then_standin_then_noise(tmp_path, samples):
    version = load_version(publish(tmp_path, "real", samples[:N]), str(tmp_path))
    same = samples[N:]
    sets = {
        "same": ImageSet("same", "test", "chest_ct", [s.image for s in same], [s.spacing_mm for s in same],
                         [s.sample_id for s in same], [s.label for s in same], [s.instance for s in same]),
        "standin": load_standin("chest_ct", N, 256, seed=3),
    }
    rng = np.random.default_rng(0)
    sets["noise"] = ImageSet("noise", "test", "chest_ct",
                             [rng.uniform(-1000, 1000, s.image.shape).astype(np.float32) for s in same],
                             [s.spacing_mm for s in same], [s.sample_id for s in same], [s.label for s in same],
                             [s.instance for s in same])
    w1, nps = {}, {}
    for k, ref in sets.items():
        rep, _ = realism(version, ref, PROFILE, None)
        w1[k] = np.mean([rep["wasserstein1"][c]
                         for c in ("lung", "fat", "soft_tissue")])
        nps[k] = rep["nps"]["distance_decades"]
    assert w1["same"] < w1["standin"] < w1["noise"], w1
    assert nps["same"] < nps["standin"] < nps["noise"], nps
    assert w1["same"] < 5  # HU: same generator, different samples


def test_frechet_and_kernel_distances_are_zero_for_identical_features_and_grow_with_a_shift():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((200, 8))
    b = rng.standard_normal((200, 8))
    assert ev.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    near, far = ev.frechet_distance(a, b), ev.frechet_distance(a, b + 1.0)
    assert near < 0.5 < far and far == pytest.approx(8.0, rel=0.25)
    assert ev.kernel_distance(a, b)[0] < ev.kernel_distance(a, b + 1.0)[0]


def test_mean_ci_is_a_student_t_interval():
    r = ev.mean_ci([0.8, 0.9, 1.0])
    assert r["mean"] == pytest.approx(0.9) and r["hi"] - r["mean"] == pytest.approx(4.303 * 0.1 / np.sqrt(3), rel=1e-3)
