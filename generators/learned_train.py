"""Training of the learned backend. ``run_training`` is the checkpoint/resume loop both routes share (the ControlNet
route, ``generators.learned_finetune``, brings its own loss); ``train`` is route 1, from scratch: AdamW on a
label-conditioned diffusion network (rectified flow or v-prediction), EMA weights, bf16 autocast on GPU, checkpoints (safetensors: weights, EMA, optimizer; JSON: step, losses) written
atomically every ``checkpoint_every`` steps with a validation grid, resuming from the last complete checkpoint, and
the export of the EMA weights as a model folder the ``learned`` backend renders with.

Every random draw of step k comes from SeedSequence(seed, (1, k)): batch choice, crops, noise and times. A run
resumed from a checkpoint therefore continues exactly as the uninterrupted run would have (bitwise on the CPU).
"""
from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from generators.learned import (CONFIG, FORMAT, PROVENANCE, WEIGHTS, build_network, from_network, one_hot, sample,
                                sample_timesteps, training_target)
from schemas.errors import SpecError
from generators.learned_data import load_prepared
from schemas.training import TrainSettings, TrainSpec, train_spec_hash

ProgressFn = Callable[[dict[str, Any]], None]
CKPT_PREFIX = "step-"
VALIDATION_SAMPLES = 6
WARMUP_STEPS = 100


# ------------------------------------------------------------------------------------------------ config
def model_config(spec: TrainSpec, meta: dict[str, Any]) -> dict[str, Any]:
    """config.json of the model folder (everything the renderer needs to rebuild the network and read its output)."""
    return {
        "format": FORMAT, "name": spec.name, "domain": meta["domain"], "route": "scratch",
        "classes": meta["classes"], "num_classes": max(int(k) for k in meta["classes"]) + 1,
        "image": {"kind": meta["image_kind"], "channels": meta["channels"], "codec": domain_codec(meta["domain"])},
        "size": spec.size, "spacing_mm": meta.get("spacing_mm"),
        "network": spec.model.model_dump(mode="json"), "objective": spec.train.objective,
        "sample_steps": spec.train.sample_steps,
    }


def domain_codec(domain: str) -> str:
    """The image codec the domain stores its images with (recorded: a render is stored through it)."""
    from schemas.domain import get_domain

    return get_domain(domain).codec


def resolve_device(v: str) -> torch.device:
    if v == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(v)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"train.device {v!r}: this machine has no CUDA GPU; accepted here: auto, cpu")
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def new_network(config: dict[str, Any], seed: int) -> torch.nn.Module:
    """The network with initial weights from ``seed`` only (global torch state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_network(config)


# ------------------------------------------------------------------------------------------------ checkpoints
def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=meta)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"]}


def _optimizer_state(tensors: dict[str, torch.Tensor], groups: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": groups["param_groups"]}


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints (state.json is written last, then the folder is renamed into place), oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(CKPT_PREFIX) and not p.name.endswith(".tmp")
                  and (p / "state.json").is_file())


def save_checkpoint(folder: Path, step: int, net: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int) -> Path:
    final = folder / f"{CKPT_PREFIX}{step:08d}"
    tmp = folder / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_tensors(net.state_dict(), tmp / "model.safetensors")
    _save_tensors(ema.state_dict(), tmp / "ema.safetensors")
    ot, og = _optimizer_tensors(opt)
    _save_tensors(ot, tmp / "optimizer.safetensors")
    (tmp / "optimizer.json").write_text(json.dumps(og))
    (tmp / "state.json").write_text(json.dumps(state))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, net: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer,
                    device: torch.device) -> dict[str, Any]:
    from generators.learned import load_state

    for f in path.iterdir():
        if f.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin", ".pkl"):
            raise SpecError(f"checkpoint {str(path)!r} holds a pickle ({f.name}); pairforge resumes from safetensors "
                            "only")
    net.load_state_dict(load_state(path / "model.safetensors", device))
    ema.load_state_dict(load_state(path / "ema.safetensors", device))
    opt.load_state_dict(_optimizer_state(load_state(path / "optimizer.safetensors", device),
                                         json.loads((path / "optimizer.json").read_text())))
    return json.loads((path / "state.json").read_text())


# ------------------------------------------------------------------------------------------------ validation grid
def display(image: np.ndarray, kind: str) -> np.ndarray:
    """uint8 RGB for looking at: CT in a wide window (-1100..500 HU: lung texture and soft tissue both visible)."""
    if kind == "hu":
        g = np.clip((image - (-1100.0)) / 1600.0 * 255.0, 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image


def validation_grid(labels: np.ndarray, reference: np.ndarray, generated: list[np.ndarray], kind: str,
                    domain: str) -> np.ndarray:
    """Rows of (label palette | reference image | generated image), 2 px gaps."""
    from generators.conditioning import segmentation_image

    rows = []
    for lab, ref, gen in zip(labels, reference, generated):
        tiles = [segmentation_image(lab, domain), display(from_network(ref, kind), kind), display(gen, kind)]
        gap = np.full((lab.shape[0], 2, 3), 255, np.uint8)
        rows.append(np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1))
        rows.append(np.full((2, rows[-1].shape[1], 3), 255, np.uint8))
    return np.concatenate(rows[:-1], axis=0)


def write_png(path: Path, rgb: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 6])


def render_validation(net: torch.nn.Module, config: dict[str, Any], labels: np.ndarray, seeds: list[int],
                      steps: int, device: torch.device, dtype: torch.dtype | None) -> list[np.ndarray]:
    c, k = config["image"]["channels"], config["num_classes"]
    noise = torch.stack([torch.randn((c, *labels.shape[1:]), generator=torch.Generator("cpu").manual_seed(s))
                         for s in seeds]).to(device)
    cond = one_hot(torch.from_numpy(labels).to(device), k)
    was = net.training
    net.eval()
    x = sample(net, cond, noise, config["objective"], steps, dtype).cpu().numpy()
    net.train(was)
    return [from_network(xi, config["image"]["kind"]) for xi in x]


# ------------------------------------------------------------------------------------------------ training
def step_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(1, step))))


def run_training(ts: TrainSettings, workdir: Path, trainable: torch.nn.Module, ema: torch.nn.Module,
                 opt: torch.optim.Optimizer, device: torch.device, step_loss: Callable[[int, np.random.Generator],
                                                                                     torch.Tensor],
                 grid: Callable[[], np.ndarray], *, pairs: int, progress: ProgressFn | None = None,
                 log: Callable[[str], None] | None = None, warmup_steps: int = 0) -> dict[str, Any]:
    """The checkpoint/resume loop both routes share. Resumes from the last complete checkpoint in
    ``workdir/checkpoints``; each step asks ``step_loss(step, rng)`` for the loss of one batch (every draw of step k from
    ``step_rng(seed, k)``), then warm-up (``warmup_steps``, linear), AdamW, gradient clipping and the EMA update; the
    mean loss is logged every ``log_every`` steps (10 on a GPU: one device sync per interval; 1 on the CPU); every
    ``checkpoint_every`` steps and at the end a checkpoint with ``grid()`` (a validation grid of the EMA weights) is
    written. Stops at ``ts.steps`` or after ``ts.max_seconds`` of this run."""
    state: dict[str, Any] = {"step": 0, "losses": [], "images_seen": 0, "train_seconds": 0.0}
    ckdir = workdir / "checkpoints"
    existing = checkpoints(ckdir)
    resumed_from = None
    if existing:
        state = load_checkpoint(existing[-1], trainable, ema, opt, device)
        resumed_from = state["step"]
        if log:
            log(f"resuming from {existing[-1].name} (step {state['step']})")
    params = [p for p in trainable.parameters() if p.requires_grad]
    ema_params = [p for p, q in zip(ema.parameters(), trainable.parameters()) if q.requires_grad]
    t_start = time.perf_counter()
    t_log, step_log = t_start, state["step"]
    loss_acc = torch.zeros((), device=device)
    acc_n = 0
    log_every = 10 if device.type == "cuda" else 1
    last_saved = state["step"] if resumed_from is not None else -1
    timing: dict[str, Any] = {"warm_step": None, "warm_time": None}
    t_ck = [time.perf_counter()]
    trainable.train()

    def checkpoint() -> Path:
        nonlocal last_saved
        state["train_seconds"] = state.get("train_seconds", 0.0) + (time.perf_counter() - t_ck[0])
        t_ck[0] = time.perf_counter()
        path = save_checkpoint(ckdir, state["step"], trainable, ema, opt, state, ts.keep_checkpoints)
        png = workdir / "validation" / f"{path.name}.png"
        write_png(png, grid())
        last_saved = state["step"]
        if progress:
            progress({"event": "checkpoint", "step": state["step"], "path": str(path), "grid": str(png)})
        return path

    if progress:
        progress({"event": "start", "step": state["step"], "steps": ts.steps, "pairs": pairs, "device": device.type,
                  "resumed_from": resumed_from})
    while state["step"] < ts.steps:
        if ts.max_seconds is not None and time.perf_counter() - t_start >= ts.max_seconds:
            break
        step = state["step"]
        loss = step_loss(step, step_rng(ts.seed, step))
        if warmup_steps:
            for group in opt.param_groups:  # linear warm-up over the first warmup_steps steps
                group["lr"] = ts.lr * min(1.0, (step + 1) / warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ts.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        state["step"] = step + 1
        state["images_seen"] += ts.batch_size
        loss_acc += loss.detach()
        acc_n += 1
        done = state["step"] >= ts.steps
        if acc_n >= log_every or done:
            mean_loss = float(loss_acc / acc_n)  # one device sync per log interval
            if not math.isfinite(mean_loss):
                raise RuntimeError(f"training diverged at step {state['step']} (loss {mean_loss}); lower train.lr")
            now = time.perf_counter()
            rate = (state["step"] - step_log) * ts.batch_size / max(now - t_log, 1e-9)
            if timing["warm_step"] is None and state["step"] - (resumed_from or 0) >= min(20, ts.steps):
                timing.update(warm_step=state["step"], warm_time=now)
            left = ts.steps - state["step"]
            eta = left * ts.batch_size / rate if rate > 0 else None
            if ts.max_seconds is not None:
                eta = min(eta or math.inf, ts.max_seconds - (now - t_start))
            state["losses"].append([state["step"], round(mean_loss, 6)])
            t_log, step_log = now, state["step"]
            loss_acc.zero_()
            acc_n = 0
            if progress:
                progress({"event": "step", "step": state["step"], "steps": ts.steps, "loss": mean_loss,
                          "images_per_s": rate, "eta_s": eta})
        if state["step"] % ts.checkpoint_every == 0:
            checkpoint()
    if last_saved != state["step"]:
        checkpoint()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_end = time.perf_counter()
    steady = None
    if timing["warm_step"] is not None and state["step"] > timing["warm_step"]:
        steady = (state["step"] - timing["warm_step"]) * ts.batch_size / (t_end - timing["warm_time"])
    return {"step": state["step"], "steps": ts.steps, "resumed_from": resumed_from,
            "checkpoint": str(checkpoints(ckdir)[-1]), "losses": state["losses"],
            "final_loss": state["losses"][-1][1] if state["losses"] else None,
            "seconds_this_run": t_end - t_start, "train_seconds": state.get("train_seconds", 0.0),
            "images_seen": state["images_seen"], "steady_images_per_s": steady, "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": "bf16" if autocast_dtype(ts.precision, device) is not None else "fp32",
            "parameters": sum(p.numel() for p in params)}


def train(spec: TrainSpec, workdir: str | Path, progress: ProgressFn | None = None,
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train (or resume) the from-scratch route in ``workdir`` (which holds ``data/`` from the flow's data
    preparation); returns a summary with the last checkpoint (``run_training``)."""
    workdir = Path(workdir)
    meta, x, y, tr, ho = load_prepared(workdir / "data")
    if meta["domain"] != spec.domain:
        raise SpecError(f"{workdir}/data holds {meta['domain']!r} pairs, the spec trains {spec.domain!r}")
    config = model_config(spec, meta)
    device = resolve_device(spec.train.device)
    dtype = autocast_dtype(spec.train.precision, device)
    ts = spec.train
    net = new_network(config, ts.seed).to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=ts.lr, betas=(0.9, 0.99), weight_decay=ts.weight_decay,
                            **({"fused": True} if device.type == "cuda" else {}))
    fwd = torch.compile(net) if ts.compile else net
    xs = torch.from_numpy(x[tr]).to(device)
    ys = torch.from_numpy(y[tr]).to(device)
    n, size, (h, w) = len(tr), spec.size, x.shape[2:]
    k = config["num_classes"]
    vidx = np.concatenate([ho, tr])[:VALIDATION_SAMPLES]  # held-out pairs first (never trained on)
    oy, ox = (h - size) // 2, (w - size) // 2
    val_labels = np.ascontiguousarray(y[vidx, oy:oy + size, ox:ox + size])
    val_ref = x[vidx, :, oy:oy + size, ox:ox + size]
    val_seeds = [int(hashlib.sha256(f"validation:{i}".encode()).hexdigest()[:15], 16) for i in range(len(vidx))]

    def step_loss(step: int, rng: np.random.Generator) -> torch.Tensor:
        g = torch.Generator(device).manual_seed(int(rng.integers(0, 2**62)))
        idx = torch.randint(0, n, (ts.batch_size,), generator=g, device=device)
        if (h, w) == (size, size):
            x0, lab = xs[idx], ys[idx]
        else:  # one random crop per sample
            cy = rng.integers(0, h - size + 1, ts.batch_size)
            cx = rng.integers(0, w - size + 1, ts.batch_size)
            x0 = torch.stack([xs[i, :, a:a + size, b:b + size] for i, a, b in zip(idx.tolist(), cy, cx)])
            lab = torch.stack([ys[i, a:a + size, b:b + size] for i, a, b in zip(idx.tolist(), cy, cx)])
        noise = torch.randn(x0.shape, generator=g, device=device)
        t = sample_timesteps(ts.objective, ts.batch_size, g, device)
        xt, target = training_target(ts.objective, x0, noise, t)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = fwd(xt, t, one_hot(lab, k))
        return F.mse_loss(out.float(), target)

    def grid() -> np.ndarray:
        gen = render_validation(ema, config, val_labels, val_seeds, ts.sample_steps, device, dtype)
        return validation_grid(val_labels, val_ref, gen, config["image"]["kind"], spec.domain)

    summary = run_training(ts, workdir, net, ema, opt, device, step_loss, grid, pairs=n, progress=progress, log=log,
                           warmup_steps=WARMUP_STEPS)
    return {**summary, "compile": ts.compile}


# ------------------------------------------------------------------------------------------------ export
def export(spec: TrainSpec, workdir: str | Path, out: str | Path, summary: dict[str, Any], spec_text: str = "",
           code_version: str = "") -> Path:
    """Write the model folder: config.json, model.safetensors (the EMA weights of the last checkpoint) and
    provenance.json (spec, training-data hashes, code version, steps, losses). Written to a temporary folder and
    renamed into place, so a reader never sees half a model."""
    workdir, out = Path(workdir), Path(out)
    meta = json.loads((workdir / "data" / "data.json").read_text())
    ck = checkpoints(workdir / "checkpoints")
    if not ck:
        raise SpecError(f"no checkpoint in {workdir}/checkpoints to export; train first")
    last = ck[-1]
    state = json.loads((last / "state.json").read_text())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(last / "ema.safetensors", tmp / WEIGHTS)
    weights_sha = hashlib.sha256((tmp / WEIGHTS).read_bytes()).hexdigest()
    cfg = {**model_config(spec, meta), "weights_sha256": weights_sha, "steps_trained": state["step"]}
    (tmp / CONFIG).write_text(json.dumps(cfg, indent=1))
    import monai

    prov = {
        "model": spec.name, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "spec": spec.model_dump(mode="json"), "spec_text": spec_text, "spec_hash": train_spec_hash(spec),
        "code_version": code_version, "libraries": {"torch": torch.__version__, "monai": monai.__version__},
        "data": {"sha256": meta["sha256"], "source": meta["source"], "pairs": meta["pairs"],
                 "train_pairs": len(meta["train_ids"]), "held_out_ids": meta["held_out_ids"],
                 "pair_sha256": meta["pair_sha256"]},
        "training": {"steps": state["step"], "images_seen": state["images_seen"], "losses": state["losses"],
                     "train_seconds": state.get("train_seconds"), "checkpoint": last.name,
                     "device": summary.get("device_name"), "precision": summary.get("precision")},
        "weights_sha256": weights_sha,
    }
    (tmp / PROVENANCE).write_text(json.dumps(prov, indent=1))
    grids = sorted((workdir / "validation").glob("*.png"))
    if grids:
        shutil.copyfile(grids[-1], tmp / "validation.png")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
