"""The controlnet render backend on CPU with tiny random-weight diffusers models saved as safetensors (no network):
end-to-end samples through flows.pipeline, label alignment, per-sample reproducibility, and every refusal."""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

from flows.pipeline import make_samples
from generators.controlnet import ControlNetRenderer, describe_ct_finding
from schemas.errors import SpecError
from schemas.sample import Layout
from schemas.spec import validate_spec
from generators.tiny_models import build_tiny_base, build_tiny_controlnet, build_tiny_sdxl_base

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # On a shared 2-core machine, two OpenMP threads per process spin against other jobs and run 10-30x slower.
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet_models")
    base = build_tiny_base(root / "base")
    return {
        "root": root, "base": str(base),
        "seg": str(build_tiny_controlnet(root / "cn_seg", base, seed=10)),
        "canny": str(build_tiny_controlnet(root / "cn_canny", base, seed=11)),
    }


def ct_spec(models, size=100, options=None, samples=4):
    opts = {"base_model": models["base"], "steps": 2,
            "controlnets": [{"path": models["seg"], "conditioning": "segmentation"}]}
    opts.update(options or {})
    return validate_spec({
        "name": "cn-test", "domain": "chest_ct", "samples": samples, "seed": 7,
        "image": {"size": size, "spacing_mm": 3.5},
        "findings": {"negatives": 0.25, "mixture": [{"kind": "solid", "diameter_mm": [8, 14], "location": "RUL",
                                                     "margin": "spiculated"}]},
        "qc": {"max_attempts": 1},  # random weights cannot pass the HU checks; one recorded attempt is enough
        "generator": {"name": "controlnet", "options": opts}})


def hand_layout(h, w, domain="chest_ct"):
    lab = np.zeros((h, w), np.uint8)
    inst = np.zeros((h, w), np.uint16)
    if domain == "chest_ct":
        lab[h // 4: 3 * h // 4, w // 8: w // 2] = 12
        lab[h // 3: h // 3 + 6, w // 5: w // 5 + 6] = 20
        inst[lab == 20] = 1
        findings = [{"kind": "solid", "diameter_mm": 8.0, "location": "RUL", "lobe": "RUL", "margin": "spiculated",
                     "instance": 1}]
    else:
        lab[h // 2: h // 2 + 2, 5: w - 5] = 1
        inst[lab == 1] = 1
        findings = [{"kind": "scratch", "length_mm": 5.0, "width_mm": 0.2, "location": "center", "instance": 1}]
    return Layout(label=lab, instance=inst, spacing_mm=0.5, findings=findings, params={"material": "brushed_metal"})


def renderer(models, domain="chest_ct", **options):
    opts = {"base_model": models["base"], "steps": 2,
            "controlnets": [{"path": models["seg"], "conditioning": "segmentation"}]}
    opts.update(options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ControlNetRenderer(domain, opts)


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("size", [100, 64])
def test_make_samples_gives_hu_images_exactly_the_label_shape(models, size):
    spec = ct_spec(models, size=size, samples=3)
    samples = make_samples(spec, range(3))
    assert len(samples) == 3
    for s in samples:
        assert s.image.shape == s.label.shape == (size, size)
        assert s.image.dtype == np.float32
        r = s.params["render"]
        lo, hi = r["output"]["hu_window"]
        assert (lo, hi) == (-1024.0, 476.0)
        assert lo <= s.image.min() and s.image.max() <= hi and s.image.std() > 0
        assert r["pad"]["padded_size"] == [128 if size == 100 else 64] * 2
        assert r["pad"]["bottom"] == r["pad"]["right"] == r["pad"]["padded_size"][0] - size
        assert r["prompt"].startswith("axial chest CT slice, lung window, ")
        assert len(r["base_model"]["sha256"]) == 64 and r["controlnets"][0]["conditioning"] == "segmentation"
        assert s.generator == {"name": "controlnet", "version": ControlNetRenderer.version}
    assert not np.array_equal(samples[0].image, samples[1].image)


def test_sample_alone_matches_the_same_sample_in_a_batch_bitwise(models):
    # euler_a draws fresh noise in every step: that noise must come from each sample's own generator too.
    # batch_invariant is set, not left to its default (true only on the CPU): that is the switch this test pins.
    opts = {"scheduler": "euler_a", "steps": 3, "batch_invariant": True,
            "controlnets": [{"path": models["seg"], "conditioning": "segmentation", "scale": 1.0},
                            {"path": models["canny"], "conditioning": "canny", "scale": 0.5, "annotator": "opencv"}]}
    spec = ct_spec(models, size=100, options=opts)
    batch = make_samples(spec, range(4))
    alone = make_samples(spec, [2])[0]
    pair = make_samples(spec, [1, 2])
    assert np.array_equal(alone.image, batch[2].image)
    assert np.array_equal(pair[0].image, batch[1].image) and np.array_equal(pair[1].image, batch[2].image)
    assert alone.params["render"]["seed"] == batch[2].params["render"]["seed"]
    assert batch[2].params["render"]["batch_invariant"] is True and batch[2].params["render"]["batch_size"] == 4
    assert batch[1].params["render"]["seed"] != batch[2].params["render"]["seed"]
    assert len(batch[2].params["render"]["controlnets"]) == 2


def test_overlapped_cpu_work_gives_the_same_images_as_serial(models):
    """overlap: control images of batch k+1 and the crop/convert of batch k on a CPU thread while batch k denoises
    (the default on CUDA) changes when work happens, not what is computed."""
    lays = [hand_layout(64, 64) for _ in range(5)]
    for k, lay in enumerate(lays):
        lay.label[k * 4: k * 4 + 8, 10:30] = 20
    serial = renderer(models, overlap=False, batch_size=2).render_batch(lays, [np.random.default_rng(k) for k in range(5)])
    overlapped = renderer(models, overlap=True, batch_size=2).render_batch(lays,
                                                                            [np.random.default_rng(k) for k in range(5)])
    assert len(overlapped) == 5
    for (a, pa), (b, pb) in zip(serial, overlapped):
        assert np.array_equal(a, b) and pa["seed"] == pb["seed"] and pa["prompt"] == pb["prompt"]
    assert not np.array_equal(serial[0][0], serial[1][0])


def test_the_seed_and_the_control_image_both_change_the_pixels(models):
    r = renderer(models)
    lay = hand_layout(64, 64)
    a, pa = r.render(lay, np.random.default_rng(1))
    b, _ = r.render(lay, np.random.default_rng(1))
    c, _ = r.render(lay, np.random.default_rng(2))
    other = hand_layout(64, 64)
    other.label[:] = 0
    d, _ = r.render(other, np.random.default_rng(1))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, d)
    assert pa["seed"] == int(np.random.default_rng(1).integers(0, 2**63 - 1))


def test_models_load_once_per_process_for_the_same_resolved_options(models):
    r1, r2 = renderer(models), renderer(models, scheduler="ddim", steps=3)
    assert r1.pipeline().unet is r2.pipeline().unet
    assert r1.pipeline().scheduler is not r2.pipeline().scheduler


def test_sdxl_family_renders_aligned_and_reproducible_and_refuses_sd15_controlnets(models):
    root = models["root"]
    if not (root / "xl_base").exists():
        build_tiny_sdxl_base(root / "xl_base")
        build_tiny_controlnet(root / "xl_cn", root / "xl_base", seed=12)
    r = renderer(models, base_model=str(root / "xl_base"), scheduler="euler_a",
                 controlnets=[{"path": str(root / "xl_cn"), "conditioning": "segmentation"}])
    lay = hand_layout(100, 64)
    batch = r.render_batch([lay] * 3, [np.random.default_rng(i) for i in range(3)])
    alone, p = r.render(lay, np.random.default_rng(1))
    assert p["family"] == "sdxl" and alone.shape == (100, 64) and alone.dtype == np.float32
    assert np.array_equal(alone, batch[1][0]) and not np.array_equal(batch[0][0], batch[1][0])
    refused(models, "does not fit the base model: cross_attention_dim", base_model=str(root / "xl_base"))


def test_surface_output_is_8bit_grey_or_rgb_at_the_label_size(models):
    lay = hand_layout(72, 100, "surface")
    grey, p = renderer(models, "surface").render(lay, np.random.default_rng(0))
    rgb, _ = renderer(models, "surface", color="rgb").render(lay, np.random.default_rng(0))
    assert grey.shape == (72, 100) and grey.dtype == np.uint8
    assert rgb.shape == (72, 100, 3) and rgb.dtype == np.uint8
    assert "5 mm long scratch at the center" in p["prompt"] and "brushed metal" in p["prompt"]


def test_custom_hu_window_maps_grey_into_that_window(models):
    img, p = renderer(models, hu_window=[-200, 300]).render(hand_layout(64, 64), np.random.default_rng(0))
    assert p["output"]["hu_window"] == [-200.0, 300.0]
    assert -200 <= img.min() and img.max() <= 300


def test_prompt_names_size_margin_kind_and_lobe():
    f = {"kind": "solid", "diameter_mm": 8.0, "location": "any", "lobe": "RUL", "margin": "spiculated"}
    assert describe_ct_finding(f) == "8 mm spiculated solid nodule in the right upper lobe"
    g = {"kind": "ground_glass", "diameter_mm": 6.25, "location": "LUL", "margin": "smooth"}
    assert describe_ct_finding(g) == "6.2 mm smooth ground-glass nodule in the left upper lobe"


# ---------------------------------------------------------------------------------------------- refusals
def refused(models, match, domain="chest_ct", **options):
    with pytest.raises(SpecError, match=match) as e:
        renderer(models, domain, **options)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_weight_folders_are_refused(models, tmp_path):
    refused(models, "base_model folder .* does not exist", base_model=str(tmp_path / "nope"))
    refused(models, r"controlnets\[0\] folder .* does not exist",
            controlnets=[{"path": str(tmp_path / "nope"), "conditioning": "canny"}])
    broken = shutil.copytree(models["base"], tmp_path / "no_vae")
    shutil.rmtree(broken / "vae")
    refused(models, "base_model vae: folder .* is missing", base_model=str(broken))


def test_repo_ids_are_looked_up_in_the_local_cache_only(models):
    msg = refused(models, "not in the local Hugging Face cache", base_model="pairforge-tests/no-such-model")
    assert "allow_download: true" in msg


def test_pickle_checkpoints_are_refused_with_the_reason(models, tmp_path):
    base = shutil.copytree(models["base"], tmp_path / "pickled")
    (base / "unet" / "diffusion_pytorch_model.safetensors").rename(base / "unet" / "diffusion_pytorch_model.bin")
    msg = refused(models, "pickle", base_model=str(base))
    assert "execute arbitrary code" in msg
    ckpt = tmp_path / "controlnet.ckpt"
    ckpt.write_bytes(b"not loaded")
    refused(models, "pickle checkpoint.*execute arbitrary code",
            controlnets=[{"path": str(ckpt), "conditioning": "segmentation"}])


@pytest.mark.parametrize("override,key", [({"cross_attention_dim": 16}, "cross_attention_dim"),
                                          ({"block_out_channels": (48, 64)}, "block_out_channels")])
def test_controlnet_for_another_base_is_refused_from_its_config(models, override, key):
    folder = models["root"] / f"mismatch_{key}"
    if not folder.exists():
        build_tiny_controlnet(folder, models["base"], overrides=override)
    refused(models, f"does not fit the base model: {key}",
            controlnets=[{"path": str(folder), "conditioning": "segmentation"}])


def test_sizes_the_model_cannot_take_are_refused_before_anything_is_generated(models):
    r = renderer(models, max_size=128)
    for h, w, match in [(32, 64, "below the 64 px"), (64, 200, "above the 128 px")]:
        with pytest.raises(SpecError, match=match):
            r.render_batch([hand_layout(64, 64), hand_layout(h, w)], [np.random.default_rng(0)] * 2)
    assert r._pipe is None  # nothing was loaded, let alone generated
    refused(models, "max_size", max_size=10_000)


def test_a_spec_image_size_above_max_size_is_refused_when_the_backend_is_built(models):
    from flows.pipeline import backend_for

    spec = ct_spec(models, size=256, options={"max_size": 128})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SpecError, match="image size 256x256 is above the 128 px"):
            backend_for(spec)


@pytest.mark.parametrize("options,match", [
    ({"sampler": "ddim"}, "unknown option.*sampler"),
    ({"scheduler": "heun"}, "scheduler.*accepted: ddim"),
    ({"controlnets": [{"path": "x", "conditioning": "segmentation", "weight": 1}]}, "unknown key.*weight"),
    ({"controlnets": [{"path": "x", "conditioning": "depth"}]}, "conditioning.*accepted: segmentation"),
    ({"controlnets": []}, "non-empty list"),
    ({"dtype": "float16", "device": "cpu"}, "float16 is not supported on the CPU"),  # auto is CUDA where there is one
    ({"device": "cuda:7"}, "CUDA GPU that this machine does not have"),
    ({"steps": 0}, "steps"),
    ({"prompt": "chest CT, {lesion}"}, r"unknown placeholder.*\{lesion\}"),
    ({"hu_window": [-2000, 0]}, "hu_window"),
    ({"color": "rgb"}, "surface domain only"),
    ({"batch_size": "many"}, "batch_size"),
    ({"compile_mode": "max-autotune-no-cudagraphs"}, "need compile: true"),
    ({"compile": True, "compile_mode": "reduce-overhead", "device": "cpu"}, "records CUDA graphs and needs a CUDA"),
    ({"compile": True, "compile_mode": "fastest"}, "compile_mode.*accepted: default, reduce-overhead"),
    ({"overlap": "yes"}, "option overlap"),
])
def test_bad_options_are_one_line_spec_errors(models, options, match):
    refused(models, match, **options)


def test_surface_refuses_ct_only_options(models):
    refused(models, "chest_ct only", "surface", hu_window="lung")
