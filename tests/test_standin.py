"""The chest-CT stand-in: rebuilt from (seed, index) alone, and imaged differently from the procedural backend."""
import numpy as np

from generators.standin import STANDIN, standin_sample, standin_samples
from schemas.classes import CT_IDS, NODULE_CLASS_IDS


def test_standin_sample_is_rebuilt_byte_identical_from_seed_and_index():
    a = standin_sample(5, size=128, seed=2)
    b = standin_samples(3, size=128, seed=2, start=4)[1]
    assert a["image"].tobytes() == b["image"].tobytes()
    assert a["label"].tobytes() == b["label"].tobytes()
    assert standin_sample(5, size=128, seed=3)["image"].tobytes() != a["image"].tobytes()


def test_standin_findings_are_labelled_at_their_size_and_spacing_is_in_its_own_range():
    lo, hi = STANDIN.spacing_mm
    seen = 0
    for d in standin_samples(8, size=256, seed=1):
        assert lo <= d["spacing_mm"] <= hi
        for f in d["findings"]:
            area = int((d["instance"] == f["instance"]).sum())
            eq = 2 * np.sqrt(area / np.pi) * d["spacing_mm"]
            assert abs(eq - f["diameter_mm"]) <= max(0.5, d["spacing_mm"])
            assert np.isin(d["label"][d["instance"] == f["instance"]], list(NODULE_CLASS_IDS)).all()
            seen += 1
    assert seen >= 4


def test_standin_noise_is_finer_grained_than_the_procedural_renderer():
    # Horizontal neighbour correlation of the residual in muscle: the stand-in's sharper kernel decorrelates it.
    from generators.ct_render import draw_render_params, render_ct

    def corr(img, lab):
        m = lab == CT_IDS["muscle"]
        m = m[:, 1:] & m[:, :-1]
        r = img - np.median(img[lab == CT_IDS["muscle"]])
        return float(np.corrcoef(r[:, 1:][m], r[:, :-1][m])[0, 1])

    d = standin_sample(0, size=256, seed=0)
    rng = np.random.default_rng(0)
    proc = render_ct(d["label"], None, d["spacing_mm"], draw_render_params(rng, d["spacing_mm"]))
    assert corr(d["image"], d["label"]) < corr(proc, d["label"]) - 0.2
