"""pairforge train: training specs, pairs from folders and versions, the from-scratch route (train, SIGKILL, resume,
export), the learned backend through a real build, bitwise-reproducible rendering, the refusals, and route 2 (a tiny
diffusers ControlNet fine-tuned on a tiny SD-1.5-shaped base). Everything on the CPU with tiny MONAI/diffusers models.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from schemas.errors import SpecError
from schemas.training import validate_train_spec

REPO = Path(__file__).resolve().parent.parent
TINY_NET = {"architecture": "spade", "channels": [8, 16], "attention_levels": [False, True], "num_res_blocks": 1,
            "num_head_channels": 8, "norm_num_groups": 4, "spade_hidden": 4}


def write_ct_pairs(folder: Path, n: int, size: int = 64, seed: int = 5) -> Path:
    """Chest-CT phantom pairs as a user would hand them over: images/ (16-bit PNG, HU + 1024), labels/ (8-bit)."""
    from generators import get_backend
    from schemas.plan import plan_sample
    from schemas.seeding import STREAM_GENERATE, sample_rng
    from schemas.spec import spec_hash, validate_spec

    spec = validate_spec({"name": "pairs", "samples": n, "seed": seed, "image": {"size": size, "spacing_mm": 5.0},
                          "findings": {"negatives": 0.5, "mixture": [{"kind": "solid", "diameter_mm": [12, 16]}]}})
    d, b = spec_hash(spec), get_backend("procedural", "chest_ct")
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for i in range(n):
        rng = sample_rng(d, i, STREAM_GENERATE)
        lay = b.layout(spec, plan_sample(spec, i, d), rng)
        img, _ = b.render(lay, rng)
        cv2.imwrite(str(folder / "images" / f"case{i:03d}.png"), (np.rint(img) + 1024).astype(np.uint16))
        cv2.imwrite(str(folder / "labels" / f"case{i:03d}.png"), lay.label)
    return folder


def train_spec(folder: Path, **train) -> dict:
    return {"name": "tiny-look", "domain": "chest_ct", "size": 64, "model": TINY_NET,
            "data": {"folder": str(folder), "image_kind": "hu", "spacing_mm": 5.0, "held_out": 0.25},
            "train": {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "sample_steps": 3, "lr": 1e-3,
                      "device": "cpu", **train}}


@pytest.fixture(scope="module")
def pairs_folder(tmp_path_factory):
    return write_ct_pairs(tmp_path_factory.mktemp("pairs") / "mine", 12)


@pytest.fixture(scope="module")
def flow_model(prefect_api, pairs_folder, tmp_path_factory):
    """The Prefect training flow run twice: 2 steps, then (the same spec asking for 4) resumed to 4 steps."""
    from flows.train import train_model

    out = tmp_path_factory.mktemp("models") / "tiny-look"
    first = train_model(train_spec(pairs_folder, steps=2), str(out))
    second = train_model(train_spec(pairs_folder, steps=4), str(out))
    return {"out": out, "first": first, "second": second}


# ------------------------------------------------------------------------------------------------ specs
@pytest.mark.parametrize("patch, words", [
    ({"data": {"folder": "/x", "version": "a@v1", "image_kind": "hu"}}, "exactly one of data.version"),
    ({"data": {"folder": "/x"}}, "image_kind is required"),
    ({"size": 63}, "not a multiple of 2"),
    ({"route": "controlnet"}, "finetune.base_model"),
    ({"train": {"device": "tpu"}}, "accepted: auto, cpu, cuda"),
    ({"epochs": 3}, "unknown field"),
])
def test_bad_training_specs_are_refused_in_one_line(patch, words):
    d = {**train_spec(Path("/x")), **patch}
    with pytest.raises(SpecError) as e:
        validate_train_spec(d)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_cli_refuses_a_bad_training_spec_with_exit_code_2(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("name: x\ndomain: chest_ct\ndata: {folder: /nowhere}\n")
    r = subprocess.run([sys.executable, "-m", "flows.cli", "train", str(p), "--out", str(tmp_path / "m")],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                       timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "image_kind is required" in r.stderr
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------------------------ data
def test_folder_pairs_are_mapped_split_and_hashed(pairs_folder, tmp_path):
    from flows.train_data import prepare
    from generators.learned_data import load_prepared

    spec = validate_train_spec(train_spec(pairs_folder))
    meta = prepare(spec, tmp_path / "data")
    assert meta["pairs"] == 12 and not meta["reused"]
    assert 0 < len(meta["held_out_ids"]) < 12 and set(meta["held_out_ids"]).isdisjoint(meta["train_ids"])
    again = prepare(spec, tmp_path / "data")
    assert again["reused"] and again["sha256"] == meta["sha256"]
    _, x, y, tr, ho = load_prepared(tmp_path / "data")
    assert x.shape == (12, 1, 64, 64) and x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1
    assert len(tr) + len(ho) == 12 and y.max() <= 24
    # One changed byte in one label changes the data hash.
    lab = cv2.imread(str(pairs_folder / "labels" / "case000.png"), cv2.IMREAD_UNCHANGED)
    copy = tmp_path / "copy"
    shutil.copytree(pairs_folder, copy)
    lab[0, 0] = 1
    cv2.imwrite(str(copy / "labels" / "case000.png"), lab)
    meta2 = prepare(validate_train_spec(train_spec(copy)), tmp_path / "data2")
    assert meta2["sha256"] != meta["sha256"]


def test_folder_labels_outside_the_class_mapping_are_refused(pairs_folder, tmp_path):
    from flows.train_data import prepare

    spec = validate_train_spec({**train_spec(pairs_folder), "data": {
        "folder": str(pairs_folder), "image_kind": "hu", "classes": {0: "air_outside", 1: "table"}}})
    with pytest.raises(SpecError, match="does not map"):
        prepare(spec, tmp_path / "d")
    spec = validate_train_spec({**train_spec(pairs_folder), "data": {
        "folder": str(pairs_folder), "image_kind": "hu", "classes": {0: "air", 1: "table"}}})
    with pytest.raises(SpecError, match="not in the chest_ct class table"):
        prepare(spec, tmp_path / "d")


def test_a_published_version_is_read_through_the_verified_reader(published_tiny, tmp_path):
    from flows.train_data import prepare

    spec = validate_train_spec({**train_spec(Path("/x")), "data": {
        "version": "tiny-ct@v1", "root": str(published_tiny["root"]), "splits": ["train", "val"]}})
    meta = prepare(spec, tmp_path / "data")
    counts = json.loads((Path(published_tiny["root"]) / "tiny-ct" / "v1" / "manifest.json").read_text())["counts"]
    assert meta["pairs"] == counts["splits"].get("train", 0) + counts["splits"].get("val", 0)
    assert meta["source"]["version"] == "tiny-ct@v1" and meta["image_kind"] == "hu"
    wrong = validate_train_spec({**train_spec(Path("/x")), "domain": "surface", "data": {
        "version": "tiny-ct@v1", "root": str(published_tiny["root"])}})
    with pytest.raises(SpecError, match="holds 'chest_ct' pairs"):
        prepare(wrong, tmp_path / "data2")


# ------------------------------------------------------------------------------------------------ train / kill / resume
KILL_CHILD = textwrap.dedent("""
    import json, sys, time, torch
    torch.set_num_threads(1)
    from schemas.training import validate_train_spec
    from generators.learned_train import train
    spec = validate_train_spec(json.loads(sys.argv[2]))
    def stall(ev):
        if ev["event"] == "checkpoint":
            print("CHECKPOINT", ev["step"], flush=True)
            time.sleep(600)  # the parent kills this process here, mid-run
    train(spec, sys.argv[1], progress=stall)
""")


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_training_killed_with_sigkill_resumes_to_the_same_weights(pairs_folder, tmp_path):
    from flows.train_data import prepare
    from generators.learned_train import checkpoints, train

    spec_d = train_spec(pairs_folder, steps=4, checkpoint_every=2)
    spec = validate_train_spec(spec_d)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
        prepare(spec, ref_dir / "data")
        prepare(spec, kill_dir / "data")
        ref = train(spec, ref_dir)
        child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(kill_dir), json.dumps(spec_d)], cwd=REPO,
                                 env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                                 stdout=subprocess.PIPE, text=True)
        line = child.stdout.readline()
        assert line.startswith("CHECKPOINT 2"), line
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
        assert child.returncode == -signal.SIGKILL
        assert [p.name for p in checkpoints(kill_dir / "checkpoints")] == ["step-00000002"]
        resumed = train(spec, kill_dir)
    finally:
        torch.set_num_threads(threads)
    assert resumed["resumed_from"] == 2 and resumed["step"] == 4 and ref["step"] == 4
    assert ref["losses"][-2:] == resumed["losses"][-2:]
    for f in ("model.safetensors", "ema.safetensors"):
        a = _tensors(ref_dir / "checkpoints" / "step-00000004" / f)
        b = _tensors(kill_dir / "checkpoints" / "step-00000004" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    assert (kill_dir / "validation" / "step-00000002.png").is_file()


def test_the_flow_trains_resumes_and_exports_a_model_folder(flow_model):
    first, second, out = flow_model["first"], flow_model["second"], Path(flow_model["out"])
    assert first["step"] == 2 and first["resumed_from"] is None
    assert second["step"] == 4 and second["resumed_from"] == 2 and second["data"]["reused"]
    cfg = json.loads((out / "config.json").read_text())
    prov = json.loads((out / "provenance.json").read_text())
    assert cfg["domain"] == "chest_ct" and cfg["steps_trained"] == 4 and cfg["route"] == "scratch"
    assert prov["data"]["pairs"] == 12 and len(prov["data"]["sha256"]) == 64 and prov["code_version"]
    assert [s for s, _ in prov["training"]["losses"]] == [1, 2, 3, 4]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "provenance.json",
                                                     "validation.png"]
    grid = cv2.imread(str(out / "validation.png"))
    assert grid.shape[0] >= 3 * 64 and grid.shape[1] == 3 * 64 + 4


# ------------------------------------------------------------------------------------------------ rendering
def _ct_spec(model: Path, **kw):
    from schemas.spec import validate_spec

    return validate_spec({"name": "learned-ct", "samples": 4, "seed": 9, "shard_size": 4,
                          "image": {"size": 64, "spacing_mm": [4.8, 5.0]}, "qc": {"max_attempts": 1},
                          "findings": {"negatives": 0.5, "mixture": [{"kind": "solid", "diameter_mm": [12, 15]}]},
                          "generator": {"name": "learned", "options": {"model": str(model), "device": "cpu",
                                                                       "steps": 3, **kw}}})


def test_rendering_is_bitwise_reproducible_and_seeded_per_sample(flow_model):
    from flows.pipeline import make_samples

    spec = _ct_spec(flow_model["out"], batch_size=4)
    a = make_samples(spec, range(4))
    b = make_samples(spec, range(4))
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b))
    assert a[0].image.dtype == np.float32 and -1024 <= a[0].image.min() and a[0].image.max() <= 1500
    assert len({s.params["render"]["seed"] for s in a}) == 4
    assert not np.array_equal(a[0].image, a[1].image)
    # Seeds come from each sample's own rng: sample 2 alone gets the seed it got in the batch.
    alone = make_samples(spec, [2])[0]
    assert alone.params["render"]["seed"] == a[2].params["render"]["seed"]
    assert a[0].params["render"]["model"]["steps_trained"] == 4


def test_a_build_renders_with_the_learned_model_and_publishes(flow_model, prefect_api, tmp_path):
    from flows.build import run_build
    from store import DatasetStore

    spec = _ct_spec(flow_model["out"])
    s = run_build(spec.model_dump(mode="json"), root=str(tmp_path))
    ds = DatasetStore(str(tmp_path)).load(f"learned-ct@v{s['version']}")
    assert len(ds) == 4
    row = ds[0]
    assert row["image"].dtype == np.float32 and row["image"].shape == (64, 64)
    gen = ds.table.column("generator").to_pylist()[0]
    params = json.loads(gen["params_json"])
    assert gen["name"] == "learned" and params["render"]["backend"] == "learned"
    assert params["render"]["model"]["name"] == "tiny-look" and len(params["render"]["model"]["weights_sha256"]) == 64


# ------------------------------------------------------------------------------------------------ refusals
def test_pickles_are_refused(flow_model, tmp_path):
    from generators import get_backend

    pt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, pt)
    with pytest.raises(SpecError, match="pickle"):
        get_backend("learned", "chest_ct", {"model": str(pt)})
    folder = tmp_path / "only-pickle"
    folder.mkdir()
    shutil.copy(pt, folder / "model.ckpt")
    shutil.copy(Path(flow_model["out"]) / "config.json", folder / "config.json")
    with pytest.raises(SpecError, match="only pickle weights"):
        get_backend("learned", "chest_ct", {"model": str(folder)})


def test_a_checkpoint_holding_a_pickle_is_not_resumed(pairs_folder, tmp_path):
    from flows.train_data import prepare
    from generators.learned_train import train

    spec = validate_train_spec(train_spec(pairs_folder, steps=1, checkpoint_every=1))
    prepare(spec, tmp_path / "data")
    ck = tmp_path / "checkpoints" / "step-00000001"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text('{"step": 1}')
    torch.save({}, ck / "model.pt")
    with pytest.raises(SpecError, match="pickle"):
        train(spec, tmp_path)


def _edited_model(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if k == "class_5":
            cfg["classes"]["5"] = v
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_a_model_with_another_class_table_is_refused(flow_model, tmp_path):
    from generators import get_backend

    m = _edited_model(flow_model["out"], tmp_path / "m", class_5="bone")
    with pytest.raises(SpecError, match="different chest_ct class table .*id 5"):
        get_backend("learned", "chest_ct", {"model": str(m)})


def test_a_model_trained_for_another_domain_is_refused(flow_model, tmp_path):
    from generators import get_backend

    m = _edited_model(flow_model["out"], tmp_path / "m", domain="surface")
    with pytest.raises(SpecError, match="trained for domain 'surface'"):
        get_backend("learned", "chest_ct", {"model": str(m)})
    with pytest.raises(SpecError, match="trained for domain 'chest_ct'"):
        get_backend("learned", "surface", {"model": str(flow_model["out"])})


def test_a_spec_far_from_the_training_spacing_is_refused(flow_model):
    from flows.pipeline import backend_for
    from schemas.spec import validate_spec

    spec = validate_spec({"name": "x", "samples": 1, "image": {"size": 64, "spacing_mm": [0.6, 0.8]},
                          "findings": {"negatives": 1},
                          "generator": {"name": "learned", "options": {"model": str(flow_model["out"])}}})
    with pytest.raises(SpecError, match="trained at"):
        backend_for(spec)


# ------------------------------------------------------------------------------------------------ route 2
def test_a_diffusers_controlnet_is_fine_tuned_resumed_and_rendered(pairs_folder, tmp_path):
    from generators.tiny_models import build_tiny_base
    from generators.learned import LearnedRenderer
    from flows.train_data import prepare
    from generators.learned_finetune import export_controlnet, train_controlnet

    base = build_tiny_base(tmp_path / "base")
    d = {**train_spec(pairs_folder, steps=2, checkpoint_every=1, batch_size=2, sample_steps=2, lr=1e-4),
         "route": "controlnet", "finetune": {"base_model": str(base), "prompt": "axial chest CT"}}
    d.pop("model")
    spec = validate_train_spec(d)
    prepare(spec, tmp_path / "work" / "data")
    first = train_controlnet(validate_train_spec({**d, "train": {**d["train"], "steps": 1}}), tmp_path / "work")
    assert first["step"] == 1
    s = train_controlnet(spec, tmp_path / "work")
    assert s["resumed_from"] == 1 and s["step"] == 2 and all(np.isfinite(v) for _, v in s["losses"])
    out = export_controlnet(spec, tmp_path / "work", tmp_path / "model", s)
    assert (out / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    r = LearnedRenderer("chest_ct", {"model": str(out), "device": "cpu", "steps": 2})
    from schemas.sample import Layout

    lab = cv2.imread(str(pairs_folder / "labels" / "case001.png"), cv2.IMREAD_UNCHANGED)
    lay = Layout(label=lab, instance=np.zeros_like(lab, np.uint16), spacing_mm=5.0, findings=[], params={})
    (img1, p1), = r.render_batch([lay], [np.random.default_rng(1)])
    (img2, _), = r.render_batch([lay], [np.random.default_rng(1)])
    assert img1.shape == (64, 64) and img1.dtype == np.float32 and np.isfinite(img1).all()
    assert img1.tobytes() == img2.tobytes() and p1["backend"] == "learned" and p1["model"]["route"] == "controlnet"
    with pytest.raises(SpecError, match="SDXL|pickle|does not exist"):
        bad = {**d, "finetune": {"base_model": str(tmp_path / "nowhere")}}
        from generators.learned_finetune import check_finetune

        check_finetune(validate_train_spec(bad))
