"""Route 2: fine-tune a diffusers ControlNet on the user's own SD-1.5 family base (a folder on disk), base UNet and
VAE frozen, on the fixed segmentation palette of our label maps; optionally LoRA on the base UNet's attention (peft).

Same interface as the from-scratch route: prepared pairs in, checkpoints (safetensors) with validation grids, resume
after a kill, a model folder out (config.json + controlnet/ + provenance.json) that the ``learned`` backend renders
through the ``controlnet`` backend. Latents are encoded once (the VAE mean) and cached on the device.
"""
from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from generators.conditioning import segmentation_image
from generators.learned import CONFIG, FORMAT, PROVENANCE, from_network
from schemas.errors import SpecError
from generators.learned_data import load_prepared
from generators.learned_train import autocast_dtype, checkpoints, resolve_device, run_training, validation_grid
from schemas.training import TrainSpec, train_spec_hash

HU_WINDOW = "wide"  # the controlnet backend's -1024..1024 HU window: grey g = (HU + 1024) / 2048
HU_LOW, HU_HIGH = -1024.0, 1024.0


def check_finetune(spec: TrainSpec):
    """Refuse what cannot be fine-tuned here before anything is read: pickles, SDXL, a ControlNet for another base,
    LoRA without peft."""
    from generators.controlnet import NetOptions, check_folders

    ft = spec.finetune
    nets = (NetOptions(ft.controlnet, "segmentation", 1.0, "opencv"),) if ft.controlnet else ()
    folders = check_folders(ft.base_model, nets, allow_download=False, hash_weights=False)
    if folders.family != "sd":
        raise SpecError("finetune.base_model is an SDXL pipeline; route controlnet fine-tunes SD-1.5 family bases")
    if ft.lora_rank:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise SpecError("finetune.lora_rank needs peft (pip install peft); set lora_rank: 0 to train the "
                            "ControlNet alone") from None
    return folders


def to_vae_rgb(x: np.ndarray, kind: str) -> np.ndarray:
    """Network-unit images (N, C, H, W) -> VAE input (N, 3, H, W) in [-1, 1] (CT: the wide HU window)."""
    if kind == "hu":
        hu = np.stack([from_network(xi, "hu") for xi in x])
        g = np.clip((hu - HU_LOW) / (HU_HIGH - HU_LOW), 0, 1)[:, None]
        g = 2 * g - 1
    else:
        g = x
    return np.repeat(g, 3, axis=1) if g.shape[1] == 1 else g


def from_vae_rgb(rgb01: np.ndarray, kind: str) -> np.ndarray:
    """A pipeline image HxWx3 in [0, 1] -> the domain's image (as the controlnet backend maps it)."""
    grey = rgb01.mean(axis=2)
    if kind == "hu":
        return (HU_LOW + grey * (HU_HIGH - HU_LOW)).astype(np.float32)
    return np.round(grey * 255).astype(np.uint8)


def _load(spec: TrainSpec, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folders = check_finetune(spec)
    base = folders.base
    kw = dict(use_safetensors=True, local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **kw)
    enc = CLIPTextModel.from_pretrained(base / "text_encoder", **kw)
    tok = CLIPTokenizer.from_pretrained(base / "tokenizer", local_files_only=True)
    sched = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    if spec.finetune.controlnet:
        net = ControlNetModel.from_pretrained(folders.controlnets[0], **kw)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.train.seed)
            net = ControlNetModel.from_unet(unet)
    for m in (unet, vae, enc):
        m.requires_grad_(False).eval()
    if spec.finetune.lora_rank:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=spec.finetune.lora_rank, lora_alpha=spec.finetune.lora_rank,
                                    init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    unet.to(device, dtype=dtype if dtype is not None and not spec.finetune.lora_rank else torch.float32)
    vae.to(device)
    enc.to(device)
    net.to(device).train()
    return folders, unet, vae, enc, tok, sched, net


class _Trainable(torch.nn.Module):
    """ControlNet (+ the UNet's LoRA layers) as one module, so checkpoints and EMA treat them alike."""

    def __init__(self, net: torch.nn.Module, unet: torch.nn.Module, lora: bool):
        super().__init__()
        self.net = net
        self.lora = torch.nn.ParameterDict(
            {k.replace(".", "__"): p for k, p in unet.named_parameters() if "lora" in k}) if lora else None


def train_controlnet(spec: TrainSpec, workdir: str | Path, progress: Callable | None = None,
                     log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train (or resume) route 2 in ``workdir``: the ControlNet (+ LoRA) loss inside the shared ``run_training``."""
    workdir = Path(workdir)
    meta, x, y, tr, ho = load_prepared(workdir / "data")
    device = resolve_device(spec.train.device)
    dtype = autocast_dtype(spec.train.precision, device)
    ts, size = spec.train, spec.size
    folders, unet, vae, enc, tok, sched, net = _load(spec, device, dtype)
    trainable = _Trainable(net, unet, bool(spec.finetune.lora_rank))
    ema = copy.deepcopy(trainable).requires_grad_(False)
    opt = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad], lr=ts.lr,
                            weight_decay=ts.weight_decay)
    with torch.no_grad():
        ids = tok([spec.finetune.prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        emb = enc(ids)[0]
        h, w = x.shape[2:]
        oy, ox = (h - size) // 2, (w - size) // 2  # route 2 trains on the centre crop (latents cached once)
        xc = x[tr, :, oy:oy + size, ox:ox + size]
        rgb = torch.from_numpy(to_vae_rgb(xc, meta["image_kind"])).float()
        lat = torch.cat([vae.encode(rgb[i:i + 8].to(device)).latent_dist.mean
                         for i in range(0, len(rgb), 8)]) * vae.config.scaling_factor
        labs = y[tr, oy:oy + size, ox:ox + size]
        ctrl = torch.from_numpy(np.stack([segmentation_image(lab, spec.domain) for lab in labs])).permute(0, 3, 1, 2)
        ctrl = (ctrl.float() / 255.0).to(device)
    n = len(tr)
    pred_type = sched.config.get("prediction_type", "epsilon")
    val_idx = (ho if len(ho) else tr)[:4]
    vlab = np.ascontiguousarray(y[val_idx, oy:oy + size, ox:ox + size])
    vref = x[val_idx, :, oy:oy + size, ox:ox + size]

    def step_loss(step: int, rng: np.random.Generator) -> torch.Tensor:
        idx = torch.from_numpy(rng.integers(0, n, ts.batch_size)).to(device)
        g = torch.Generator(device).manual_seed(int(rng.integers(0, 2**62)))
        x0 = lat[idx]
        noise = torch.randn(x0.shape, generator=g, device=device)
        t = torch.randint(0, sched.config.num_train_timesteps, (ts.batch_size,), generator=g, device=device)
        noisy = sched.add_noise(x0, noise, t)
        target = sched.get_velocity(x0, noise, t) if pred_type == "v_prediction" else noise
        e = emb.expand(ts.batch_size, -1, -1)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            down, mid = net(noisy, t, encoder_hidden_states=e, controlnet_cond=ctrl[idx], return_dict=False)
            pred = unet(noisy, t, encoder_hidden_states=e, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
        return F.mse_loss(pred.float(), target.float())

    def grid() -> np.ndarray:
        gen = render_validation(spec, unet, vae, ema.net, emb, sched, vlab, meta["image_kind"], device)
        return validation_grid(vlab, vref, gen, meta["image_kind"], spec.domain)

    summary = run_training(ts, workdir, trainable, ema, opt, device, step_loss, grid, pairs=n, progress=progress,
                           log=log)
    return {**summary, "parameters": sum(p.numel() for p in net.parameters())}


@torch.no_grad()
def render_validation(spec: TrainSpec, unet, vae, net, emb, sched, labels: np.ndarray, kind: str,
                      device: torch.device) -> list[np.ndarray]:
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, controlnet=net,
                                             scheduler=DDIMScheduler.from_config(sched.config), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ctrl = torch.from_numpy(np.stack([segmentation_image(lab, spec.domain) for lab in labels])).permute(0, 3, 1, 2)
    gens = [torch.Generator("cpu").manual_seed(i) for i in range(len(labels))]
    was = net.training
    net.eval()
    out = pipe(prompt_embeds=emb.expand(len(labels), -1, -1), image=ctrl.float() / 255.0, height=labels.shape[1],
               width=labels.shape[2], num_inference_steps=spec.train.sample_steps, guidance_scale=1.0,
               generator=gens, output_type="np").images
    net.train(was)
    return [from_vae_rgb(np.asarray(im, np.float32), kind) for im in out]


def export_controlnet(spec: TrainSpec, workdir: str | Path, out: str | Path, summary: dict[str, Any],
                      spec_text: str = "", code_version: str = "") -> Path:
    """Model folder: config.json (route controlnet, base model path), controlnet/ (EMA weights, diffusers format,
    safetensors), provenance.json. LoRA layers, when trained, are saved beside it as lora.safetensors."""
    from diffusers import ControlNetModel

    from generators.learned import load_state

    workdir, out = Path(workdir), Path(out)
    meta = json.loads((workdir / "data" / "data.json").read_text())
    last = checkpoints(workdir / "checkpoints")[-1]
    state = json.loads((last / "state.json").read_text())
    folders = check_finetune(spec)
    base_cfg = folders.base / "unet"
    ema = load_state(last / "ema.safetensors")
    if spec.finetune.controlnet:
        net = ControlNetModel.from_pretrained(folders.controlnets[0], use_safetensors=True, local_files_only=True)
    else:
        from diffusers import UNet2DConditionModel

        net = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(base_cfg.parent, subfolder="unet",
                                                                             use_safetensors=True))
    net.load_state_dict({k.removeprefix("net."): v for k, v in ema.items() if k.startswith("net.")})
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    net.save_pretrained(tmp / "controlnet", safe_serialization=True)
    lora = {k: v for k, v in ema.items() if k.startswith("lora.")}
    if lora:
        from safetensors.torch import save_file

        save_file(lora, str(tmp / "lora.safetensors"))
    wsha = hashlib.sha256((tmp / "controlnet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    cfg = {"format": FORMAT, "name": spec.name, "domain": meta["domain"], "route": "controlnet",
           "classes": meta["classes"], "num_classes": max(int(k) for k in meta["classes"]) + 1,
           "image": {"kind": meta["image_kind"], "channels": meta["channels"]}, "size": spec.size,
           "spacing_mm": meta.get("spacing_mm"), "sample_steps": spec.train.sample_steps,
           "finetune": {"base_model": str(folders.base), "prompt": spec.finetune.prompt, "hu_window": HU_WINDOW,
                        "lora_rank": spec.finetune.lora_rank},
           "weights_sha256": wsha, "steps_trained": state["step"]}
    (tmp / CONFIG).write_text(json.dumps(cfg, indent=1))
    prov = {"model": spec.name, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "spec": spec.model_dump(mode="json"), "spec_text": spec_text, "spec_hash": train_spec_hash(spec),
            "code_version": code_version, "base_model": folders.base_fingerprint,
            "data": {"sha256": meta["sha256"], "source": meta["source"], "pairs": meta["pairs"],
                     "held_out_ids": meta["held_out_ids"], "pair_sha256": meta["pair_sha256"]},
            "training": {"steps": state["step"], "losses": state["losses"], "checkpoint": last.name},
            "weights_sha256": wsha}
    (tmp / PROVENANCE).write_text(json.dumps(prov, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
