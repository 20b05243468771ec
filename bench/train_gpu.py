"""Train the from-scratch learned backend on a "real" stand-in and measure what it learned (one GPU run).

    python bench/train_gpu.py --out bench_out/train_gpu.json            # GPU: 2,000 + 200 pairs at 128², 240 s
    python bench/train_gpu.py --cpu-reduced --out bench_out/train_cpu.json  # no GPU: 64², 300 + 40 pairs, 600 s
    python bench/train_gpu.py --tiny --out /tmp/train_tiny.json         # CPU check: 64², a few steps, < 2 min

1. Pairs: the evaluation's "real" stand-in (``generators/standin.py``: another population, scanner calibration,
   kernel, noise and cupping; spacing scaled to show the whole chest at ``--size``), made in parallel on every CPU
   core; the last ``--held-out`` pairs are held out (never trained on). The held-out label maps are
   also rendered by the default procedural renderer: the fair baseline (what a user gets without training).
2. Training: route 1 (MONAI SPADE diffusion UNet, rectified flow, EMA, bf16 autocast on GPU, flash attention) for
   ``--train-s`` seconds of wall time, through the training loop (no Prefect), checkpoints with validation grids.
3. Rendering: held-out label maps through the exported model folder with the ``learned`` backend's code.
4. Report (JSON at ``--out``, grid PNG and the model folder beside it): training images/s and wall time; realism
   distance to the held-out stand-in images (per-class HU histogram Wasserstein-1; Fréchet distance of simple image
   features) for learned vs procedural; label fidelity (per-finding CNR and nodule HU error; Dice of a small
   segmenter trained on stand-in images); memorisation (nearest-neighbour distance of each render to the training
   images vs to other held-out images, against the same ratio for real held-out images).
Needs numpy, scipy, opencv, torch, pydantic, monai, safetensors; not Prefect, not the store.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generators.ct_render import draw_render_params, render_ct  # noqa: E402
from schemas.classes import CT_CLASSES, CT_IDS  # noqa: E402
from schemas.errors import PlacementError  # noqa: E402
from schemas.seeding import sample_rng  # noqa: E402

BASELINE_STREAM = 8  # extra rng stream: the baseline renderer's draws
STANDIN_SEED = 11


def standin_config(size: int):
    """The evaluation's stand-in (generators/standin.py), with two settings fitted to the training size: pixel spacing
    scaled so the field of view is the whole chest, as the stand-in's 256 px default shows it (128 px: 2.6-3.2 mm,
    64 px: 5.2-6.4 mm), and nodules of 10-24 mm, a few pixels across at that spacing."""
    from dataclasses import replace

    from generators.standin import STANDIN

    f = 256 / size
    return replace(STANDIN, spacing_mm=(STANDIN.spacing_mm[0] * f, STANDIN.spacing_mm[1] * f),
                   diameter_mm=(10.0, 24.0))


def make_pair(args) -> dict:
    size, index, baseline = args
    from generators.chest_ct import draw_slice
    from generators.standin import standin_sample

    try:
        s = standin_sample(index, size=size, seed=STANDIN_SEED, cfg=standin_config(size))
    except PlacementError:
        return {"index": index, "ok": False}
    out = {"index": index, "ok": True, "label": s["label"], "instance": s["instance"].astype(np.uint8),
           "standin": s["image"], "kinds": [f["kind"] for f in s["findings"]], "spacing_mm": s["spacing_mm"]}
    if baseline:  # the same label map through the default procedural renderer (its lobe map rebuilt from the record)
        _, lobes, _ = draw_slice(s["params"]["anatomy"], size, size, s["spacing_mm"])
        q = draw_render_params(sample_rng(spec_digest(size), index, BASELINE_STREAM), s["spacing_mm"])
        out["procedural"] = render_ct(s["label"], lobes, s["spacing_mm"], q)
    return out


def spec_digest(size: int) -> str:
    import hashlib

    return hashlib.sha256(f"train-gpu-baseline-{STANDIN_SEED}-{size}".encode()).hexdigest()


def make_pairs(size: int, n_train: int, n_held: int, workers: int) -> dict:
    n = n_train + n_held
    jobs = [(size, i, i >= n_train) for i in range(n)]
    t0 = time.perf_counter()
    if workers > 1:
        with get_context("fork").Pool(workers) as pool:
            res = pool.map(make_pair, jobs, chunksize=max(1, n // (workers * 8)))
    else:
        res = [make_pair(j) for j in jobs]
    res = [r for r in res if r["ok"]]
    tr = [r for r in res if r["index"] < n_train]
    ho = [r for r in res if r["index"] >= n_train]
    sp = [r["spacing_mm"] for r in res]
    return {"train": tr, "held": ho, "seconds": time.perf_counter() - t0,
            "spacing_mm": [round(float(min(sp)), 3), round(float(max(sp)), 3)]}


# ------------------------------------------------------------------------------------------------ metrics
def class_w1(ref: list[np.ndarray], test: list[np.ndarray], labels: list[np.ndarray], max_n: int = 200_000) -> dict:
    """Per-class Wasserstein-1 (HU) between pooled pixel values of ``test`` and ``ref`` images on the same labels."""
    from scipy.stats import wasserstein_distance

    lab = np.stack(labels)
    r, t = np.stack(ref), np.stack(test)
    rng = np.random.default_rng(0)
    out = {}
    for k, name in CT_CLASSES.names.items():
        m = lab == k
        cnt = int(m.sum())
        if cnt < 200:
            continue
        a, b = r[m], t[m]
        if cnt > max_n:
            sel = rng.choice(cnt, max_n, replace=False)
            a, b = a[sel], b[sel]
        out[name] = {"w1_hu": float(wasserstein_distance(a, b)), "pixels": cnt}
    tot = sum(v["pixels"] for v in out.values())
    return {"classes": out, "mean_w1_hu": float(np.mean([v["w1_hu"] for v in out.values()])),
            "pixel_weighted_w1_hu": float(sum(v["w1_hu"] * v["pixels"] for v in out.values()) / tot)}


GROUPS = {
    "lung": [CT_IDS[n] for n in ("lung_rul", "lung_rml", "lung_rll", "lung_lul", "lung_lll")],
    "fat": [CT_IDS["subcutaneous_fat"], CT_IDS["mediastinal_fat"]],
    "soft": [CT_IDS["muscle"], CT_IDS["heart"], CT_IDS["liver"]],
    "bone": [CT_IDS["cortical_bone"], CT_IDS["cancellous_bone"]],
}


def image_features(img: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """Per-tissue mean/std, the spectrum of the fine residual in the lungs and soft tissue (5 log bands each), and
    edge-sharpness percentiles: a small, interpretable feature vector."""
    import cv2

    f = []
    for ids in GROUPS.values():
        m = np.isin(lab, ids)
        v = img[m] if m.sum() > 10 else np.zeros(1, np.float32)
        f += [float(v.mean()), float(v.std())]
    resid = img - cv2.GaussianBlur(img, (0, 0), 2.0)
    for ids in (GROUPS["lung"], GROUPS["soft"]):
        m = np.isin(lab, ids).astype(np.float32)
        spec = np.abs(np.fft.fftshift(np.fft.fft2(resid * m))) ** 2
        h, w = spec.shape
        yy, xx = np.mgrid[:h, :w]
        rr = np.hypot(yy - h / 2, xx - w / 2) / (min(h, w) / 2)
        edges = np.array([0.05, 0.15, 0.3, 0.5, 0.75, 1.0])
        area = max(m.sum(), 1.0)
        for a, b in zip(edges[:-1], edges[1:]):
            f.append(float(np.log10(spec[(rr >= a) & (rr < b)].mean() / area + 1e-6)))
    gy, gx = np.gradient(img)
    g = np.hypot(gx, gy)
    f += [float(np.percentile(g, q)) for q in (50, 90, 99)]
    return np.array(f, np.float64)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (features z-scored on the reference ``a``)."""
    from scipy import linalg

    mu, sd = a.mean(0), a.std(0) + 1e-6
    a, b = (a - mu) / sd, (b - mu) / sd
    m1, m2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(c1 @ c2)
    covmean = covmean[0] if isinstance(covmean, tuple) else covmean
    covmean = covmean.real
    return float(((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean))


def finding_cnr(img: np.ndarray, lab: np.ndarray, inst: np.ndarray) -> list[dict]:
    """Per finding: mean HU inside, and CNR against a 3-pixel ring of lung around it."""
    import cv2

    out = []
    lung = np.isin(lab, GROUPS["lung"] + [CT_IDS["pulmonary_vessel"]])
    for k in np.unique(inst)[1:]:
        m = inst == k
        ring = cv2.dilate(m.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool) & ~m & lung
        if m.sum() < 3 or ring.sum() < 5:
            continue
        bg = img[ring]
        out.append({"mean_hu": float(img[m].mean()),
                    "cnr": float(abs(img[m].mean() - bg.mean()) / (bg.std() + 1e-6))})
    return out


def cnr_summary(images, labels, instances, ref_images) -> dict:
    cnr, err = [], []
    for img, lab, inst, ref in zip(images, labels, instances, ref_images):
        a, b = finding_cnr(img, lab, inst), finding_cnr(ref, lab, inst)
        cnr += [x["cnr"] for x in a]
        err += [abs(x["mean_hu"] - y["mean_hu"]) for x, y in zip(a, b)]
    return {"findings": len(cnr), "median_cnr": float(np.median(cnr)) if cnr else None,
            "share_cnr_ge_3": float(np.mean(np.array(cnr) >= 3)) if cnr else None,
            "median_abs_nodule_hu_error_vs_standin": float(np.median(err)) if err else None}


def nn_memorisation(renders: np.ndarray, train: np.ndarray, held: np.ndarray, real_held: np.ndarray, device) -> dict:
    """Nearest-neighbour L2 distances (network units, per pixel RMS) of each render to the training images and to
    the held-out images other than its own pair; the same for the real held-out images as the reference."""
    import torch

    def flat(a):
        return torch.from_numpy(a.reshape(len(a), -1)).float().to(device)

    tr, ho = flat(train), flat(held)
    d = tr.shape[1]

    def dists(q):
        q = flat(q)
        dt = torch.cdist(q, tr).min(1).values / d ** 0.5
        dh = torch.cdist(q, ho)
        dh.fill_diagonal_(float("inf"))  # not its own pair
        return dt.cpu().numpy(), (dh.min(1).values / d ** 0.5).cpu().numpy()

    rt, rh = dists(renders)
    qt, qh = dists(real_held)
    return {"render_nn_train_median": float(np.median(rt)), "render_nn_heldout_median": float(np.median(rh)),
            "render_ratio_train_over_heldout": float(np.median(rt / rh)),
            "real_nn_train_median": float(np.median(qt)), "real_nn_heldout_median": float(np.median(qh)),
            "real_ratio_train_over_heldout": float(np.median(qt / qh)),
            "renders_closer_to_train_than_any_real_is": float(np.mean(rt < qt.min()))}


def segmenter_dice(train_x, train_lab, tests: dict, seconds: float, device, tiny: bool) -> dict:
    """A small MONAI UNet trained on stand-in images for ``seconds`` to segment lung / nodule; its Dice on each test
    set (images rendered from the held-out label maps) says how recognisably each renders the labels."""
    import torch
    import torch.nn.functional as F
    from monai.networks.nets import BasicUNet

    def target(lab):
        t = np.zeros(lab.shape, np.int64)
        t[np.isin(lab, GROUPS["lung"] + [CT_IDS["pulmonary_vessel"], 18, 19])] = 1
        t[np.isin(lab, [CT_IDS["nodule_solid"], CT_IDS["nodule_ground_glass"]])] = 2
        return t

    g = torch.Generator("cpu").manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=3,
                        features=(8, 8, 16, 32, 64, 8) if tiny else (16, 32, 64, 128, 256, 16)).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    xs = torch.from_numpy(train_x).float().to(device)
    ys = torch.from_numpy(target(train_lab)).to(device)
    weight = torch.tensor([1.0, 1.0, 5.0], device=device)
    t0, steps = time.perf_counter(), 0
    dtype = torch.bfloat16 if device.type == "cuda" else None
    while time.perf_counter() - t0 < seconds:
        idx = torch.randint(0, len(xs), (32 if not tiny else 4,), generator=g).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = net(xs[idx])
        loss = F.cross_entropy(logits.float(), ys[idx], weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    net.eval()
    out = {"train_steps": steps, "train_seconds": seconds}
    with torch.no_grad():
        for name, (x, lab) in tests.items():
            pred = torch.cat([net(torch.from_numpy(x[i:i + 64]).float().to(device)).argmax(1).cpu()
                              for i in range(0, len(x), 64)]).numpy()
            t = target(lab)
            res = {}
            for c, cname in ((1, "lung"), (2, "nodule")):
                inter = ((pred == c) & (t == c)).sum((1, 2))
                den = (pred == c).sum((1, 2)) + (t == c).sum((1, 2))
                has = (t == c).sum((1, 2)) > 0
                res[f"dice_{cname}"] = float(np.mean(2 * inter[has] / np.maximum(den[has], 1))) if has.any() else None
            out[name] = res
    return out


def grid_png(path: Path, labels, standin, learned, procedural) -> None:
    from generators.conditioning import segmentation_image
    from generators.learned_train import display, write_png

    rows = []
    for lab, a, b, c in zip(labels, standin, learned, procedural):
        tiles = [segmentation_image(lab, "chest_ct"), display(a, "hu"), display(b, "hu"), display(c, "hu")]
        gap = np.full((lab.shape[0], 2, 3), 255, np.uint8)
        row = tiles[0]
        for t in tiles[1:]:
            row = np.concatenate([row, gap, t], axis=1)
        rows += [row, np.full((2, row.shape[1], 3), 255, np.uint8)]
    write_png(path, np.concatenate(rows[:-1], axis=0))


def save_ema_shards(model_dir: Path, dest: Path, stem: str, max_bytes: int = 15 * 2**20) -> list[str]:
    """The model's EMA weights in bf16 as sharded safetensors (``<stem>-0000k-of-0000n.safetensors`` + an index,
    the Hugging Face sharded layout) next to ``config.json``, small enough to come back from a GPU machine; a later
    run rebuilds the network from the config and starts from these weights."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
             for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    shards, cur, size = [], {}, 0
    for k in sorted(state):
        nbytes = state[k].numel() * state[k].element_size()
        if cur and size + nbytes > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = state[k]
        size += nbytes
    shards.append(cur)
    files, weight_map = [], {}
    for i, sh in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, str(dest / name), metadata={"dtype": "bfloat16", "source": "EMA weights"})
        weight_map.update({k: name for k in sh})
        files.append(str(dest / name))
    (dest / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {"dtype": "bfloat16"},
                                                                     "weight_map": weight_map}, indent=0))
    shutil.copyfile(model_dir / "config.json", dest / f"{stem}_config.json")
    return files + [str(dest / f"{stem}.safetensors.index.json"), str(dest / f"{stem}_config.json")]


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_out/train_gpu.json")
    ap.add_argument("--tiny", action="store_true", help="CPU check: 64 px, few pairs, a small model, a few steps")
    ap.add_argument("--cpu-reduced", action="store_true",
                    help="the run at reduced size for a machine without a GPU: 64 px, 300 + 40 pairs, a small "
                         "model (channels 8/16/32), 8 sampler steps, --train-s 600 unless given")
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--held-out", type=int, default=200)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--train-s", type=float, default=240.0)
    ap.add_argument("--seg-s", type=float, default=25.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--arch", default="spade", choices=["spade", "controlnet"])
    ap.add_argument("--channels", default="64,128,256")
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--checkpoint-every", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", default="/tmp/pairforge_train_gpu", help="working folder (pairs, full checkpoints)")
    a = ap.parse_args()
    small = a.tiny or a.cpu_reduced  # one residual block per level, narrow norms
    if a.cpu_reduced and not a.tiny:
        given = {x.split("=")[0] for x in sys.argv[1:]}
        a.pairs, a.held_out, a.size, a.batch, a.lr = 300, 40, 64, 8, 2e-3
        a.channels, a.sample_steps, a.checkpoint_every = "8,16,32", 8, 100
        a.train_s = a.train_s if "--train-s" in given else 600.0
        a.seg_s = a.seg_s if "--seg-s" in given else 60.0
    if a.tiny:
        a.pairs, a.held_out, a.size, a.train_s, a.seg_s, a.batch = 40, 8, 64, min(a.train_s, 25.0), 4.0, 4
        a.channels, a.sample_steps, a.checkpoint_every = "16,32", 4, 6
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(a.work)  # pairs cache and full checkpoints (optimizer state): large, kept out of --out's folder
    report: dict = {"args": vars(a)}
    t_all = time.perf_counter()

    # 1. pairs (before torch is imported: the pool forks a plain numpy/OpenCV process)
    data = make_pairs(a.size, a.pairs, a.held_out, a.workers)
    report["data"] = {"train_pairs": len(data["train"]), "held_out_pairs": len(data["held"]),
                      "seconds": round(data["seconds"], 2), "workers": a.workers, "size": a.size,
                      "spacing_mm": data["spacing_mm"]}
    print(f"pairs: {len(data['train'])} train + {len(data['held'])} held out in {data['seconds']:.1f} s", flush=True)

    import torch

    from generators.learned import LearnedRenderer, to_network
    from schemas.training import validate_train_spec
    from generators.learned_data import Pairs, write_prepared
    from generators.learned_train import export, train

    allp = data["train"] + data["held"]
    ids = [f"{r['index']:07d}" for r in allp]
    pairs = Pairs(ids, [r["standin"] for r in allp], [r["label"] for r in allp], ids, "hu", data["spacing_mm"],
                  {"bench": "generators.standin", "size": a.size})
    held_ids = {f"{r['index']:07d}" for r in data["held"]}
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    write_prepared(pairs, work / "data", a.size, 0.0, 0, "chest_ct", held=held_ids)
    ch = [int(c) for c in a.channels.split(",")]
    spec = validate_train_spec({
        "name": "standin-learned", "domain": "chest_ct", "data": {"folder": str(work), "image_kind": "hu"},
        "size": a.size,
        "model": {"architecture": a.arch, "channels": ch, "attention_levels": [False] * (len(ch) - 1) + [True],
                  "num_res_blocks": 1 if small else 2, "num_head_channels": min(32, ch[-1]),
                  "norm_num_groups": 8 if small else 32, "spade_hidden": 8 if small else 32},
        "train": {"steps": 10_000_000, "max_seconds": a.train_s, "batch_size": a.batch, "lr": a.lr,
                  "ema_decay": 0.995 if small else 0.999, "checkpoint_every": a.checkpoint_every,
                  "sample_steps": a.sample_steps, "device": a.device, "compile": a.compile, "keep_checkpoints": 1}})

    # 2. train
    t0, c0 = time.perf_counter(), time.process_time()
    summary = train(spec, work, progress=lambda e: print(
        f"step {e['step']} loss {e['loss']:.4f} {e['images_per_s']:.0f} img/s", flush=True)
        if e["event"] == "step" and e["step"] % (100 if not a.tiny else 2) == 0 else None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    model_dir = work / "model"
    export(spec, work, model_dir, summary, code_version="bench/train_gpu.py")
    ema_files = save_ema_shards(model_dir, out.parent, out.stem + "_ema")
    report["training"] = {k: summary[k] for k in ("step", "images_seen", "steady_images_per_s", "device_name",
                                                  "precision", "compile", "parameters", "final_loss",
                                                  "seconds_this_run")}
    report["training"]["wall_s_including_checkpoints"] = round(wall, 2)
    report["training"]["images_per_s_overall"] = summary["images_seen"] / wall
    # CPU time of this process: on a shared machine, images per CPU-second says what the hardware did.
    report["training"]["process_cpu_s"] = round(cpu, 1)
    report["training"]["images_per_process_cpu_s"] = summary["images_seen"] / max(cpu, 1e-9)
    report["training"]["loss_curve"] = summary["losses"][:: max(1, len(summary["losses"]) // 40)]
    print(f"trained {summary['step']} steps, {summary['images_seen']} images in {wall:.1f} s "
          f"(steady {summary['steady_images_per_s'] or 0:.1f} img/s)", flush=True)

    # 3. render the held-out label maps with the learned model (the backend's own code path)
    held = data["held"]
    r = LearnedRenderer("chest_ct", {"model": str(model_dir), "device": a.device, "batch_size": 256 if not small
                                     else 8})
    t0 = time.perf_counter()
    seeds = [1_000_003 * (i + 1) for i in range(len(held))]
    learned = []
    for s in range(0, len(held), r.batch_size):
        learned += r.generate([h["label"] for h in held[s:s + r.batch_size]], seeds[s:s + r.batch_size])
    if r.device.type == "cuda":
        torch.cuda.synchronize()
    rs = time.perf_counter() - t0
    report["rendering"] = {"images": len(learned), "seconds": round(rs, 2), "images_per_s": len(learned) / rs,
                           "steps": r.steps, "precision": r.precision}

    # 4. metrics: learned and procedural, each against the held-out stand-in images
    labels = [h["label"] for h in held]
    inst = [h["instance"] for h in held]
    standin = [h["standin"] for h in held]
    proc = [h["procedural"] for h in held]
    w_learned, w_proc = class_w1(standin, learned, labels), class_w1(standin, proc, labels)
    f_ref = np.stack([image_features(i, l) for i, l in zip(standin, labels)])
    f_learned = np.stack([image_features(i, l) for i, l in zip(learned, labels)])
    f_proc = np.stack([image_features(i, l) for i, l in zip(proc, labels)])
    # Reference spread: the stand-in's own train images vs its held-out ones (what "indistinguishable" scores).
    trn = data["train"][: len(held)]
    f_ref2 = np.stack([image_features(t["standin"], t["label"]) for t in trn])
    report["realism"] = {
        "learned": {"mean_w1_hu": w_learned["mean_w1_hu"], "pixel_weighted_w1_hu": w_learned["pixel_weighted_w1_hu"],
                    "feature_frechet": frechet(f_ref, f_learned)},
        "procedural": {"mean_w1_hu": w_proc["mean_w1_hu"], "pixel_weighted_w1_hu": w_proc["pixel_weighted_w1_hu"],
                       "feature_frechet": frechet(f_ref, f_proc)},
        "standin_train_vs_heldout_feature_frechet": frechet(f_ref, f_ref2),
        "per_class_w1_hu": {k: {"learned": w_learned["classes"][k]["w1_hu"],
                                "procedural": w_proc["classes"].get(k, {}).get("w1_hu")}
                            for k in w_learned["classes"]},
    }
    report["label_fidelity"] = {"standin": cnr_summary(standin, labels, inst, standin),
                                "learned": cnr_summary(learned, labels, inst, standin),
                                "procedural": cnr_summary(proc, labels, inst, standin)}
    dev = torch.device("cuda" if (a.device == "auto" and torch.cuda.is_available()) or a.device.startswith("cuda")
                       else "cpu")
    tr_x = np.stack([to_network(t["standin"], "hu") for t in data["train"]])
    tests = {name: (np.stack([to_network(i, "hu") for i in imgs]), np.stack(labels))
             for name, imgs in (("standin_heldout", standin), ("learned", learned), ("procedural", proc))}
    report["label_fidelity"]["segmenter"] = segmenter_dice(tr_x, np.stack([t["label"] for t in data["train"]]),
                                                           tests, a.seg_s, dev, small)
    report["memorisation"] = nn_memorisation(tests["learned"][0], tr_x, tests["standin_heldout"][0],
                                             tests["standin_heldout"][0], dev)
    grid_png(out.with_name(out.stem + "_grid.png"), labels[:6], standin[:6], learned[:6], proc[:6])
    report["files"] = {"grid": str(out.with_name(out.stem + "_grid.png")), "model": str(model_dir),
                       "ema_shards": ema_files,
                       "validation_grids": sorted(str(p) for p in (work / "validation").glob("*.png"))}
    report["total_wall_s"] = round(time.perf_counter() - t_all, 1)
    report["prefect_imported"] = "prefect" in sys.modules
    out.write_text(json.dumps(report, indent=1, default=float))

    rl, rp = report["realism"]["learned"], report["realism"]["procedural"]
    seg = report["label_fidelity"]["segmenter"]
    print("\n| metric | learned | procedural |\n| --- | --- | --- |")
    print(f"| mean per-class W1 (HU) vs held-out stand-in | {rl['mean_w1_hu']:.1f} | {rp['mean_w1_hu']:.1f} |")
    print(f"| pixel-weighted W1 (HU) | {rl['pixel_weighted_w1_hu']:.1f} | {rp['pixel_weighted_w1_hu']:.1f} |")
    print(f"| feature Fréchet (stand-in train vs held-out: "
          f"{report['realism']['standin_train_vs_heldout_feature_frechet']:.2f}) | {rl['feature_frechet']:.2f} | "
          f"{rp['feature_frechet']:.2f} |")
    lf = report["label_fidelity"]
    print(f"| median finding CNR (stand-in {lf['standin']['median_cnr']}) | {lf['learned']['median_cnr']} | "
          f"{lf['procedural']['median_cnr']} |")
    print(f"| median |nodule HU - stand-in| | {lf['learned']['median_abs_nodule_hu_error_vs_standin']} | "
          f"{lf['procedural']['median_abs_nodule_hu_error_vs_standin']} |")
    print(f"| segmenter Dice lung / nodule (stand-in {seg['standin_heldout']}) | {seg['learned']} | "
          f"{seg['procedural']} |")
    m = report["memorisation"]
    print(f"memorisation: NN train/held-out ratio renders {m['render_ratio_train_over_heldout']:.3f} vs real "
          f"{m['real_ratio_train_over_heldout']:.3f}; renders closer to train than any real: "
          f"{m['renders_closer_to_train_than_any_real_is']:.3f}")
    t = report["training"]
    print(f"training: {t['step']} steps, {t['images_seen']} images, steady {t['steady_images_per_s'] or 0:.1f} img/s, "
          f"overall {t['images_per_s_overall']:.1f} img/s on {t['device_name']} ({t['precision']}); "
          f"total {report['total_wall_s']} s; report {out}")


if __name__ == "__main__":
    main()
