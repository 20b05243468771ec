"""Images/s of the controlnet backend against a plain diffusers ControlNet pipeline, on the same GPU in one run.

Models are the full-size SD-1.5 UNet + ControlNet + VAE + CLIP-L text encoder *architectures* with random weights
(built from the configs below, saved as safetensors to a temp folder: no download). The tokenizer is the tiny
byte-level CLIP vocabulary of generators/tiny_models.py (the text encoder's cost does not depend on the vocabulary).

  (a) baseline: StableDiffusionControlNetPipeline.from_pretrained(...), default settings (float32, its default
      scheduler), called once per image;
  (b) pairforge: generators.controlnet.ControlNetRenderer.render_batch (batched, bfloat16, SDPA, channels_last,
      optional torch.compile), same scheduler and steps as (a).

Achieved TFLOP/s counts UNet + ControlNet FLOPs (torch.utils.flop_counter on one classifier-free-guidance step;
VAE and text encoder excluded) against the GPU's dense bf16 peak.

    python bench/bench_controlnet_gpu.py --device cuda [--compile] [--images 32] [--baseline-images 8]
    python bench/bench_controlnet_gpu.py --device cpu --tiny        # smoke test of this script (< 1 minute)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215,
)
SD15_CLIP = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 pad_token_id=1, bos_token_id=0, eos_token_id=2)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
FOLDER_SCHEDULERS = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
                     "UniPCMultistepScheduler": "unipc", "DPMSolverMultistepScheduler": "dpm++",
                     "EulerAncestralDiscreteScheduler": "euler_a", "DDPMScheduler": "ddpm"}
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against torch.cuda.get_device_name in this order.
BF16_PEAK_TFLOPS = [("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4), ("GH200", 989.4),
                    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
                    ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 6000 Ada", 364.2)]


def build_sd15_folders(root: Path, device: torch.device) -> tuple[Path, Path]:
    """Full-size SD-1.5 architectures with random weights, saved as float16 safetensors (diffusers layout)."""
    from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from generators.tiny_models import write_tiny_clip_tokenizer

    vocab = write_tiny_clip_tokenizer(root / "_tok")
    with torch.device(device):  # initialise on the GPU: seconds instead of minutes for 1.3 B parameters
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SD15_CLIP, vocab_size=vocab))
        controlnet = ControlNetModel.from_unet(unet)
    half = dict(device="cpu", dtype=torch.float16)
    pipe = StableDiffusionPipeline(unet=unet.to(**half), vae=vae.to(**half), text_encoder=text.to(**half),
                                   tokenizer=CLIPTokenizer.from_pretrained(root / "_tok"),
                                   scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "sd15", safe_serialization=True)
    controlnet.to(**half).save_pretrained(root / "controlnet_seg", safe_serialization=True)
    del pipe, unet, vae, text, controlnet
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return root / "sd15", root / "controlnet_seg"


def build_tiny_folders(root: Path) -> tuple[Path, Path]:
    from generators.tiny_models import build_tiny_base, build_tiny_controlnet

    base = build_tiny_base(root / "tiny_base")
    return base, build_tiny_controlnet(root / "tiny_controlnet", base)


def make_layouts(n: int, size: int):
    """Real chest-CT layouts (the project's layout generator) at ``size`` px."""
    from generators.base import get_backend
    from schemas.plan import plan_sample
    from schemas.seeding import STREAM_GENERATE, sample_rng
    from schemas.spec import spec_hash, validate_spec

    spec = validate_spec({"name": "bench-controlnet", "domain": "chest_ct", "samples": n,
                          "image": {"size": size, "spacing_mm": round(350.0 / size, 4)},
                          "findings": {"negatives": 0.2, "mixture": ["8mm solid nodule, right upper lobe",
                                                                     "spiculated nodule 12mm LLL"]}})
    backend = get_backend("procedural", "chest_ct")  # only its layout generator is used
    digest = spec_hash(spec)
    layouts, rngs = [], []
    for i in range(n):
        rng = sample_rng(digest, i, STREAM_GENERATE)
        layouts.append(backend.layout(spec, plan_sample(spec, i, digest), rng))
        rngs.append(rng)
    return layouts, rngs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(renderer, size: int) -> int:
    """FLOPs of one denoising step for one image: ControlNet + UNet on the CFG pair (batch 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    pipe = renderer.pipeline()
    dev, dt = renderer.device, renderer.dtype
    lat = size // renderer.folders.vae_scale
    unet_cfg = pipe.unet.config
    x = torch.zeros(2, unet_cfg.in_channels, lat, lat, device=dev, dtype=dt)
    emb = torch.zeros(2, 77, unet_cfg.cross_attention_dim, device=dev, dtype=dt)
    cond = torch.zeros(2, 3, size, size, device=dev, dtype=dt)
    t = torch.tensor(500, device=dev)
    # .forward: count the eager graph even when the modules were compiled in place.
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        down, mid = pipe.controlnet.forward(x, t, encoder_hidden_states=emb, controlnet_cond=cond, return_dict=False)
        pipe.unet.forward(x, t, encoder_hidden_states=emb, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid)
    return int(counter.get_total_flops())


def bf16_peak(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "given with --peak-tflops"
    if device.type != "cuda":
        return None, "no peak for a CPU"
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS:
        if key in name:
            return peak, f"{name}: dense bf16 tensor peak from the table in this script"
    return None, f"{name}: not in the table; pass --peak-tflops"


def run_baseline(base: Path, cn: Path, device: torch.device, control: np.ndarray, prompt: str, n: int,
                 steps: int, size: int) -> float:
    """(a) plain diffusers, default settings (float32, the folder's scheduler), one call per image."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    net = ControlNetModel.from_pretrained(cn, use_safetensors=True)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=net, use_safetensors=True,
                                                             safety_checker=None, requires_safety_checker=False)
    pipe = pipe.to(device=device, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(control)
    gen = torch.Generator("cpu")
    pipe(prompt, image=image, num_inference_steps=steps, height=size, width=size, generator=gen.manual_seed(0))
    sync(device)
    t0 = time.perf_counter()
    for i in range(n):
        pipe(prompt, image=image, num_inference_steps=steps, height=size, width=size, generator=gen.manual_seed(i))
    sync(device)
    seconds = time.perf_counter() - t0
    del pipe, net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny random models (smoke test of this script)")
    ap.add_argument("--size", type=int, default=None, help="image side in px (default 512; 128 with --tiny)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; 4 with --tiny)")
    ap.add_argument("--images", type=int, default=None, help="images for (b) (default 32; 4 with --tiny)")
    ap.add_argument("--baseline-images", type=int, default=None, help="images for (a) (default 8; 2 with --tiny)")
    ap.add_argument("--batch-size", default="auto", help="(b) batch size: auto or N")
    ap.add_argument("--dtype", default=None, help="(b) dtype (default bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--scheduler", default=None, help="(b) scheduler (default: the model folder's, as (a) uses)")
    ap.add_argument("--compile", action="store_true", help="(b) torch.compile the UNet and ControlNet")
    ap.add_argument("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak, if not in the table")
    ap.add_argument("--models", default=None, help="folder to build/reuse the model folders in (default: temp)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible; run with --device cpu --tiny for the smoke test", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(1)  # smoke runs share small CPUs; spinning OpenMP threads would dominate the timing
    size = args.size or (128 if args.tiny else 512)
    steps = args.steps or (4 if args.tiny else 20)
    n_b = args.images or (4 if args.tiny else 32)
    n_a = args.baseline_images or (2 if args.tiny else 8)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)

    tmp = None
    if args.models:
        root = Path(args.models)
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="pairforge-bench-")
        root = Path(tmp.name)
    t0 = time.perf_counter()
    names = ("tiny_base", "tiny_controlnet") if args.tiny else ("sd15", "controlnet_seg")
    if (root / names[0] / "model_index.json").exists() and (root / names[1] / "config.json").exists():
        base, cn = root / names[0], root / names[1]
    else:
        base, cn = build_tiny_folders(root) if args.tiny else build_sd15_folders(root, device)
    build_s = time.perf_counter() - t0

    from generators.conditioning import pad_label, segmentation_image
    from generators.controlnet import ControlNetRenderer

    folder_scheduler = json.loads((base / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    scheduler = args.scheduler or FOLDER_SCHEDULERS[folder_scheduler]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        renderer = ControlNetRenderer("chest_ct", {
            "base_model": str(base), "controlnets": [{"path": str(cn), "conditioning": "segmentation"}],
            "steps": steps, "scheduler": scheduler, "dtype": dtype, "device": str(device),
            "batch_size": batch_size, "compile": args.compile})
    warm_layouts, warm_rngs = make_layouts(1, size)
    prompt, _ = renderer.prompt_for(warm_layouts[0])
    control = segmentation_image(pad_label(warm_layouts[0].label)[0], "chest_ct")

    # (a) first, alone on the GPU; its models are freed before (b) loads.
    a_s = run_baseline(base, cn, device, control, prompt, n_a, steps, size)

    # (b) load, size the batch from the memory left, warm up on one full batch (compiles when asked), then time
    # whole batches only (a last partial batch would recompile a compiled model).
    renderer.pipeline()
    bs = renderer.auto_batch_size(size, size)
    n_b = max(1, -(-n_b // bs)) * bs
    warm_layouts, warm_rngs = make_layouts(bs, size)
    layouts, rngs = make_layouts(n_b, size)
    t0 = time.perf_counter()
    renderer.render_batch(warm_layouts, warm_rngs)
    sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = renderer.render_batch(layouts, rngs)
    sync(device)
    b_s = time.perf_counter() - t0
    assert len(results) == n_b and results[0][0].shape == (size, size)

    flops = step_flops(renderer, size)
    flops_per_image = flops * steps
    peak, peak_note = bf16_peak(device, args.peak_tflops)
    a_ips, b_ips = n_a / a_s, n_b / b_s
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "models": "tiny random (generators/tiny_models.py)" if args.tiny else "SD-1.5 UNet + ControlNet architectures, "
                  "random weights", "size": size, "steps": steps, "scheduler": scheduler,
        "a_baseline": {"images": n_a, "seconds": round(a_s, 3), "images_per_s": round(a_ips, 4), "dtype": "float32",
                       "batch": 1},
        "b_pairforge": {"images": n_b, "seconds": round(b_s, 3), "images_per_s": round(b_ips, 4), "dtype": dtype,
                        "batch": bs, "compile": args.compile, "batch_invariant": renderer.batch_invariant,
                        "warmup_seconds": round(warm_s, 2)},
        "speedup_b_over_a": round(b_ips / a_ips, 3),
        "unet_controlnet_gflop_per_step_cfg": round(flops / 1e9, 2),
        "achieved_tflops_b": round(b_ips * flops_per_image / 1e12, 3),
        "achieved_tflops_a": round(a_ips * flops_per_image / 1e12, 3),
        "bf16_peak_tflops": peak, "peak_note": peak_note,
        "model_build_seconds": round(build_s, 1),
        "versions": {"torch": torch.__version__},
    }
    if peak:
        out["mfu_b"] = round(out["achieved_tflops_b"] / peak, 4)
    print(f"device: {out['device']}   models: {out['models']}   {size}x{size}, {steps} steps ({scheduler})")
    print(f"(a) diffusers default, float32, 1 image/call : {a_ips:8.3f} images/s  ({n_a} images, {a_s:.2f} s)")
    print(f"(b) pairforge {dtype}, batch {bs}{', compiled' if args.compile else ''}      : {b_ips:8.3f} images/s  "
          f"({n_b} images, {b_s:.2f} s; warm-up {warm_s:.1f} s)")
    target = "target >= 3x" if device.type == "cuda" and not args.tiny else "smoke run: not a performance number"
    print(f"speed-up (b)/(a): {out['speedup_b_over_a']:.2f}x   ({target})")
    of_peak = f" = {100 * out['mfu_b']:.1f}% of {peak:g} bf16 peak ({peak_note})" if peak else f" ({peak_note})"
    print(f"UNet+ControlNet: {flops / 1e9:.1f} GFLOP per step (CFG pair); achieved (b) {out['achieved_tflops_b']:.3f} "
          f"TFLOP/s{of_peak}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
