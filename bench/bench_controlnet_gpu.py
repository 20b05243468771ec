"""ControlNet rendering speed, measured fairly: diffusers as shipped, diffusers as a competent user runs it, and
pairforge eager and fast, in ONE process on the same GPU, models, prompts, control images, seeds and steps.

Models are the full-size SD-1.5 UNet + ControlNet + VAE + CLIP-L text encoder *architectures* with random weights
(built from the configs below and saved as float16 safetensors to a folder: no download). The tokenizer is the tiny
byte-level CLIP vocabulary of generators/tiny_models.py (the text encoder's cost does not depend on the vocabulary).
Layouts are real chest-CT label maps from the project's layout generator; prompts and control images are pairforge's
own, handed to diffusers as ready tensors (pairforge computes its own inside its timing: it is charged more work).

Configurations (``--only`` picks; each fails soft: its error is printed and recorded, the others still run):

  a_diffusers_default   StableDiffusionControlNetPipeline.from_pretrained, float32, one image per call
  b_diffusers_fp16      the same with torch_dtype=float16, SDPA (diffusers' default on torch 2), --batch prompts a call
  b_diffusers_bf16      the same in bfloat16 (the reference for PSNR: the bf16 pipeline with the same seeds)
  c_pairforge_eager     ControlNetRenderer.render_batch, bfloat16, batch --batch, no compile
  d_pairforge_fast      the same with compile (--compile-mode; CUDA graphs in reduce-overhead/max-autotune),
                        channels_last, fused QKV, static batch shapes, a persistent compile cache (--compile-cache),
                        CPU work overlapped with denoising. Warm-up (compile) is timed and printed on its own.
  d_pairforge_fast_warm the fast configuration again in a fresh process with the same compile cache: the warm-up a
                        second build on this machine pays (skipped when the budget is spent)

Every configuration gets one untimed warm-up batch, then whole batches are timed (``--budget-s`` scales how many).
FLOPs: UNet + ControlNet on one classifier-free-guidance step (the pair of rows), counted with
torch.utils.flop_counter on the eager modules; VAE and text encoder are excluded from FLOPs (not from the timing).
% of peak is against the dense bf16 tensor peak (989.4 TFLOP/s for H100 SXM / H200, NVIDIA's datasheet figure).

    python bench/bench_controlnet_gpu.py --budget-s 200 --out results/controlnet_gpu.json
    python bench/bench_controlnet_gpu.py --tiny --out /tmp/controlnet_tiny.json    # CPU smoke run (< 60 s)
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
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
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against torch.cuda.get_device_name in this order.
BF16_PEAK_TFLOPS = [("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4), ("GH200", 989.4),
                    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0)]
CONFIGS = ("a_diffusers_default", "b_diffusers_fp16", "b_diffusers_bf16", "c_pairforge_eager", "d_pairforge_fast",
           "d_pairforge_fast_warm")
# Share of the budget each configuration may spend on timed batches (warm-ups, loads and compiles come on top).
SHARE = {"a_diffusers_default": 0.03, "b_diffusers_fp16": 0.04, "b_diffusers_bf16": 0.04, "c_pairforge_eager": 0.05,
         "d_pairforge_fast": 0.06}
PSNR_MIN_DB = 35.0


# ------------------------------------------------------------------------------------------------ models
def build_sd15_folders(root: Path, device: torch.device) -> tuple[Path, Path]:
    """Full-size SD-1.5 architectures with random weights, saved as float16 safetensors (diffusers layout)."""
    from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from generators.tiny_models import write_tiny_clip_tokenizer

    torch.manual_seed(0)  # the bench's own weights; nothing in pairforge reads torch's global generator
    vocab = write_tiny_clip_tokenizer(root / "_tok")
    with torch.device(device):  # initialise on the GPU: seconds instead of minutes for 1.3 B parameters
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SD15_CLIP, vocab_size=vocab))
        controlnet = ControlNetModel.from_unet(unet)
        with torch.no_grad():  # from_unet zero-initialises the ControlNet's output convs: give the control path weight
            for name, p in controlnet.named_parameters():
                if name.startswith(("controlnet_cond_embedding.conv_out", "controlnet_down_blocks",
                                    "controlnet_mid_block")):
                    p.normal_(0.0, 0.02)
    half = dict(device="cpu", dtype=torch.float16)
    pipe = StableDiffusionPipeline(unet=unet.to(**half), vae=vae.to(**half), text_encoder=text.to(**half),
                                   tokenizer=CLIPTokenizer.from_pretrained(root / "_tok"),
                                   scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "sd15", safe_serialization=True)
    controlnet.to(**half).save_pretrained(root / "controlnet_seg", safe_serialization=True)
    del pipe, unet, vae, text, controlnet
    free_memory(device)
    return root / "sd15", root / "controlnet_seg"


def build_tiny_folders(root: Path) -> tuple[Path, Path]:
    from diffusers import PNDMScheduler

    from generators.tiny_models import build_tiny_base, build_tiny_controlnet

    base = build_tiny_base(root / "tiny_base")
    PNDMScheduler(**SD15_SCHEDULER).save_pretrained(base / "scheduler")  # the same scheduler as the full-size run
    return base, build_tiny_controlnet(root / "tiny_controlnet", base)


def make_layouts(n: int, size: int):
    """Real chest-CT layouts (the project's layout generator) at ``size`` px, with each sample's generator."""
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


# ------------------------------------------------------------------------------------------------ helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two images in [0, 1] (peak 1); 999 for bitwise-identical images (JSON has no infinity)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 999.0 if mse == 0 else 10.0 * np.log10(1.0 / mse)


def bf16_peak(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "given with --peak-tflops"
    if device.type != "cuda":
        return None, "no peak for a CPU"
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS:
        if key in name:
            return peak, f"{name}: dense bf16 tensor peak {peak:g} TFLOP/s (datasheet, no sparsity)"
    return None, f"{name}: not in the table; pass --peak-tflops"


def step_flops(unet, controlnet, size: int, vae_scale: int, device: torch.device, dtype: torch.dtype) -> int:
    """FLOPs of one denoising step for one image: ControlNet + UNet on the CFG pair (batch 2), eager modules."""
    from torch.utils.flop_counter import FlopCounterMode

    lat = size // vae_scale
    g = torch.Generator("cpu").manual_seed(0)  # random inputs, never zeros
    x = torch.randn(2, unet.config.in_channels, lat, lat, generator=g).to(device, dtype)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    cond = torch.rand(2, 3, size, size, generator=g).to(device, dtype)
    t = torch.tensor(500, device=device)
    fwd_c = getattr(controlnet, "_orig_mod", controlnet).forward
    fwd_u = getattr(unet, "_orig_mod", unet).forward
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        down, mid = fwd_c(x, t, encoder_hidden_states=emb, controlnet_cond=cond, return_dict=False)
        fwd_u(x, t, encoder_hidden_states=emb, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    return int(counter.get_total_flops())


class Work:
    """The shared inputs: layouts, each sample's pristine generator, prompts and control tensors."""

    def __init__(self, layouts, rngs, renderer):
        self.layouts, self.rngs = layouts, rngs
        self.prompts = [renderer.prompt_for(lay) for lay in layouts]
        self.controls = [renderer.control_images(lay.label)[0][0] for lay in layouts]

    def seeds(self, idx):
        from schemas.seeding import torch_seed

        return [torch_seed(copy.deepcopy(self.rngs[i])) for i in idx]  # what render_batch draws, rngs untouched

    def batch(self, k: int, bs: int) -> list[int]:
        n = len(self.layouts)
        return [(k * bs + j) % n for j in range(bs)]


def time_batches(run_one, n_batches_for, device) -> dict:
    """Warm-up batch (timed separately), then whole timed batches; returns seconds and counts."""
    t0 = time.perf_counter()
    first = run_one(0)
    sync(device)
    warm = time.perf_counter() - t0
    k = n_batches_for(warm)
    t0 = time.perf_counter()
    for b in range(1, k + 1):
        run_one(b)
    sync(device)
    return {"warmup_s": warm, "batches": k, "seconds": time.perf_counter() - t0, "first": first}


# --------------------------------------------------------------------------------------------- configurations
def run_diffusers(base: Path, cn: Path, work: Work, dtype: torch.dtype, bs: int, steps: int, size: int,
                  device: torch.device, n_batches_for) -> dict:
    """diffusers' own pipeline: from_pretrained with torch_dtype, on the device, SDPA (its default on torch 2)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    t0 = time.perf_counter()
    net = ControlNetModel.from_pretrained(cn, torch_dtype=dtype, use_safetensors=True)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=net, torch_dtype=dtype,
                                                             use_safetensors=True, safety_checker=None,
                                                             requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0

    def run_one(k: int):
        idx = work.batch(k, bs)
        control = torch.from_numpy(np.stack([work.controls[i] for i in idx])).permute(0, 3, 1, 2).float() / 255.0
        gens = [torch.Generator("cpu").manual_seed(s) for s in work.seeds(idx)]
        out = pipe(prompt=[work.prompts[i][0] for i in idx], negative_prompt=[work.prompts[i][1] for i in idx],
                   image=control, height=size, width=size, num_inference_steps=steps, generator=gens,
                   output_type="np")
        return np.asarray(out.images, np.float32).mean(axis=3)  # grey in [0, 1], as pairforge maps to HU

    r = time_batches(run_one, n_batches_for, device)
    del pipe, net
    free_memory(device)
    r["load_s"] = load_s
    return r


def make_renderer(base: Path, cn: Path, steps: int, dtype: str, device: torch.device, bs: int, extra: dict):
    from generators.controlnet import ControlNetRenderer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ControlNetRenderer("chest_ct", {
            "base_model": str(base), "controlnets": [{"path": str(cn), "conditioning": "segmentation"}],
            "steps": steps, "scheduler": "pndm", "dtype": dtype, "device": str(device), "batch_size": bs,
            "batch_invariant": False, **extra})


def run_pairforge(renderer, work: Work, bs: int, device: torch.device, n_batches_for) -> dict:
    t0 = time.perf_counter()
    renderer.pipeline()
    load_s = time.perf_counter() - t0
    lo, hi = renderer.state["hu_window"]  # the chest-CT hook's grey -> HU window

    def run_one(k: int):
        idx = work.batch(k, bs)
        res = renderer.render_batch([work.layouts[i] for i in idx], [copy.deepcopy(work.rngs[i]) for i in idx])
        return np.stack([(img - lo) / (hi - lo) for img, _ in res]).astype(np.float32)

    r = time_batches(run_one, n_batches_for, device)
    r["load_s"] = load_s
    return r


def warm_cache_child(args) -> int:
    """--warm-child: a fresh process that loads the fast configuration with the same compile cache and renders one
    batch; prints the warm-up seconds as JSON (what a second build on the same machine pays)."""
    device = torch.device(args.device)
    t0 = time.perf_counter()
    layouts, rngs = make_layouts(args.batch, args.size)
    r = make_renderer(Path(args.warm_child[0]), Path(args.warm_child[1]), args.steps, args.dtype, device, args.batch,
                      fast_options(args))
    t1 = time.perf_counter()
    renderer_pipe = r.pipeline()
    assert renderer_pipe is not None
    t2 = time.perf_counter()
    r.render_batch(layouts, rngs)
    sync(device)
    t3 = time.perf_counter()
    print(json.dumps({"layouts_s": t1 - t0, "load_s": t2 - t1, "first_batch_s": t3 - t2}))
    return 0


def fast_options(args) -> dict:
    # --tiny on a CPU: Dynamo tracing without Inductor (a C++ compile of every kernel takes minutes on a small CPU);
    # it runs the compiled path's plumbing (static batch shapes, padding, overlap), not its speed.
    return {"compile": True, "compile_mode": args.compile_mode, "compile_cache": args.compile_cache,
            "overlap": True, **({"compile_backend": "eager"} if args.tiny else {})}


# ------------------------------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny random models on the CPU (smoke run, < 60 s)")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds for the whole run (default 200; 45 tiny)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--only", default=",".join(CONFIGS), help=f"comma list of: {', '.join(CONFIGS)}")
    ap.add_argument("--size", type=int, default=None, help="image side in px (default 512; 128 with --tiny)")
    ap.add_argument("--steps", type=int, default=None, help="PNDM steps (default 20; 4 with --tiny)")
    ap.add_argument("--batch", type=int, default=None, help="prompts per call for b, c, d (default 16; 2 tiny)")
    ap.add_argument("--dtype", default=None, help="pairforge dtype (default bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--compile-mode", default=None,
                    help="d's torch.compile mode (default reduce-overhead on CUDA: Inductor + CUDA graphs, which "
                         "compiles within the budget; max-autotune adds GEMM/conv autotuning, minutes more when cold; "
                         "default on the CPU). If a CUDA-graph mode fails, d is rerun with mode default.")
    ap.add_argument("--compile-cache", default=None,
                    help="persistent compile cache folder (default ~/.cache/pairforge/torch-compile)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, if the GPU is not in the table")
    ap.add_argument("--models", default=None, help="folder to build/reuse the model folders in (default: temp)")
    ap.add_argument("--warm-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.device == "auto":
        args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible; run with --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    if not args.tiny and device.type == "cpu":
        print("full-size SD-1.5 on a CPU would take hours; use --tiny on a CPU", file=sys.stderr)
        return 2
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    if device.type == "cpu":
        torch.set_num_threads(1)  # smoke runs share small CPUs; spinning OpenMP threads would dominate the timing
    args.size = args.size or (128 if args.tiny else 512)
    args.steps = args.steps or (3 if args.tiny else 20)
    args.batch = args.batch or (2 if args.tiny else 16)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    args.compile_mode = args.compile_mode or ("reduce-overhead" if device.type == "cuda" else "default")
    args.compile_cache = args.compile_cache or os.path.expanduser("~/.cache/pairforge/torch-compile")
    budget = args.budget_s or (45.0 if args.tiny else 200.0)
    if args.warm_child:
        return warm_cache_child(args)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        ap.error(f"unknown configuration(s) {', '.join(unknown)}; accepted: {', '.join(CONFIGS)}")

    t_start = time.perf_counter()
    left = lambda: budget - (time.perf_counter() - t_start)  # noqa: E731
    tmp = None
    if args.models:
        root = Path(args.models)
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="pairforge-bench-")
        root = Path(tmp.name)
    names_on_disk = ("tiny_base", "tiny_controlnet") if args.tiny else ("sd15", "controlnet_seg")
    if (root / names_on_disk[0] / "model_index.json").exists() and (root / names_on_disk[1] / "config.json").exists():
        base, cn = root / names_on_disk[0], root / names_on_disk[1]
    else:
        base, cn = build_tiny_folders(root) if args.tiny else build_sd15_folders(root, device)
    build_s = time.perf_counter() - t_start
    print(f"models ready in {build_s:.1f} s", flush=True)

    bs, size, steps = args.batch, args.size, args.steps
    n_layouts = 2 * bs
    layouts, rngs = make_layouts(n_layouts, size)
    ref_renderer = make_renderer(base, cn, steps, args.dtype, device, bs, {})
    work = Work(layouts, rngs, ref_renderer)
    peak, peak_note = bf16_peak(device, args.peak_tflops)
    out: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "models": "tiny random (generators/tiny_models.py)" if args.tiny else
                  "SD-1.5 UNet + ControlNet + VAE + CLIP-L architectures, random weights",
        "size": size, "steps": steps, "scheduler": "pndm", "batch": bs, "budget_s": budget,
        "bf16_peak_tflops": peak, "peak_note": peak_note, "model_build_s": round(build_s, 1),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]},
        "command": " ".join(["python"] + sys.argv), "configs": {},
    }
    try:
        import diffusers
        import transformers

        out["versions"].update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    firsts: dict[str, np.ndarray] = {}
    flops = None

    def n_batches(name: str, per_call: int):
        def pick(warm_s: float) -> int:
            # A warm-up that compiled says nothing about a batch's time: assume a tenth of it, at least one batch.
            est = warm_s / (10.0 if name.startswith("d_") else 1.0)
            lo = 1 if args.tiny else (4 if per_call == 1 else 2)  # at least a few images on a GPU: one is noise
            return int(max(lo, min(8 if per_call == 1 else 4, (SHARE.get(name, 0.05) * budget) // max(est, 1e-3))))
        return pick

    for name in names:
        if name == "d_pairforge_fast_warm":
            continue  # after the others, in its own process
        if left() < (5 if args.tiny else 20):
            out["configs"][name] = {"skipped": f"budget spent ({budget:g} s)"}
            print(f"{name:24s} skipped: budget spent", flush=True)
            continue
        try:
            if name.startswith("a_"):
                r = run_diffusers(base, cn, work, torch.float32, 1, steps, size, device, n_batches(name, 1))
                per_call, dtype_name = 1, "float32"
            elif name.startswith("b_"):
                dt = torch.float16 if name.endswith("fp16") else torch.bfloat16
                if device.type == "cpu" and dt == torch.float16:
                    raise RuntimeError("float16 is not run on the CPU (half-precision CPU kernels are missing)")
                if device.type == "cpu":
                    dt = torch.float32  # smoke run: CPU bf16 convolutions are slow and pairforge runs float32 here
                r = run_diffusers(base, cn, work, dt, bs, steps, size, device, n_batches(name, bs))
                per_call, dtype_name = bs, str(dt).removeprefix("torch.")
            else:
                from generators import controlnet as gc_mod

                gc_mod._MODEL_CACHE.clear()
                extra = fast_options(args) if name.startswith("d_") else {"overlap": True}
                renderer = make_renderer(base, cn, steps, args.dtype, device, bs, extra)
                try:
                    r = run_pairforge(renderer, work, bs, device, n_batches(name, bs))
                except Exception as e:
                    if not (name.startswith("d_") and args.compile_mode in ("reduce-overhead", "max-autotune")):
                        raise
                    # CUDA graphs failed: record why, and measure compile without them (its kernels are cached).
                    out["configs"][name + "_cudagraphs_error"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                    print(f"{name}: {args.compile_mode} failed ({type(e).__name__}: {e}); again with mode default",
                          flush=True)
                    traceback.print_exc(limit=6)
                    del renderer
                    gc_mod._MODEL_CACHE.clear()
                    torch._dynamo.reset()
                    free_memory(device)
                    args.compile_mode = "default"
                    renderer = make_renderer(base, cn, steps, args.dtype, device, bs, fast_options(args))
                    r = run_pairforge(renderer, work, bs, device, n_batches(name, bs))
                per_call, dtype_name = bs, args.dtype
                if flops is None:
                    pipe = renderer.pipeline()
                    flops = step_flops(pipe.unet, pipe.controlnet, size, renderer.folders.vae_scale, device,
                                       renderer.dtype)
                    out["unet_controlnet_gflop_per_cfg_step"] = round(flops / 1e9, 2)
                del renderer
                gc_mod._MODEL_CACHE.clear()
                free_memory(device)
            images = r["batches"] * per_call
            rec = {"images": images, "seconds": round(r["seconds"], 3), "images_per_s": round(images / r["seconds"], 4),
                   "dtype": dtype_name, "per_call": per_call, "warmup_s": round(r["warmup_s"], 2),
                   "load_s": round(r["load_s"], 2)}
            if name.startswith("d_"):
                rec.update(compile_mode=args.compile_mode, compile_cache=args.compile_cache,
                           compile_warmup_s=round(r["warmup_s"], 2))
            firsts[name] = r["first"]
            out["configs"][name] = rec
            print(f"{name:24s} {rec['images_per_s']:8.3f} images/s  ({images} images in {r['seconds']:.1f} s; "
                  f"warm-up {r['warmup_s']:.1f} s, load {r['load_s']:.1f} s)", flush=True)
        except Exception as e:  # fail soft: record it, run the rest
            out["configs"][name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name:24s} FAILED: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=6)
            free_memory(device)

    if "d_pairforge_fast_warm" in names:
        name = "d_pairforge_fast_warm"
        if "error" in out["configs"].get("d_pairforge_fast", {}) or left() < (10 if args.tiny else 45):
            out["configs"][name] = {"skipped": "budget spent or d_pairforge_fast failed"}
            print(f"{name:24s} skipped", flush=True)
        else:
            try:
                argv = [sys.executable, str(Path(__file__).resolve()), "--warm-child", str(base), str(cn),
                        "--device", args.device, "--size", str(size), "--steps", str(steps), "--batch", str(bs),
                        "--dtype", args.dtype, "--compile-mode", args.compile_mode,
                        "--compile-cache", args.compile_cache] + (["--tiny"] if args.tiny else [])
                p = subprocess.run(argv, capture_output=True, text=True, timeout=max(30, left() + 30))
                if p.returncode != 0:
                    raise RuntimeError(p.stderr.strip()[-1500:])
                rec = json.loads(p.stdout.strip().splitlines()[-1])
                rec = {k: round(v, 2) for k, v in rec.items()}
                out["configs"][name] = rec
                print(f"{name:24s} warm-cache start: load {rec['load_s']:.1f} s, first batch (compile from the "
                      f"cache) {rec['first_batch_s']:.1f} s", flush=True)
            except Exception as e:
                out["configs"][name] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{name:24s} FAILED: {type(e).__name__}: {e}", flush=True)

    # Ratios, TFLOP/s, quality.
    C = out["configs"]
    ref = next((C[k]["images_per_s"] for k in ("b_diffusers_bf16", "b_diffusers_fp16") if "images_per_s" in C.get(k, {})),
               None)
    best_b = max((C[k]["images_per_s"] for k in ("b_diffusers_fp16", "b_diffusers_bf16")
                  if "images_per_s" in C.get(k, {})), default=None)
    for k, rec in C.items():
        if "images_per_s" not in rec:
            continue
        if best_b:
            rec["vs_competent_diffusers"] = round(rec["images_per_s"] / best_b, 3)
        if flops:
            rec["tflops"] = round(rec["images_per_s"] * steps * flops / 1e12, 2)
            if peak:
                rec["pct_of_bf16_peak"] = round(100 * rec["tflops"] / peak, 1)
    quality = {}
    if "b_diffusers_bf16" in firsts:
        ref_img = firsts["b_diffusers_bf16"]
        for k, img in firsts.items():
            if k != "b_diffusers_bf16" and img.shape == ref_img.shape:
                quality[f"{k} vs b_diffusers_bf16"] = round(psnr_db(img, ref_img), 2)
    if "c_pairforge_eager" in firsts and "d_pairforge_fast" in firsts:
        quality["d_pairforge_fast vs c_pairforge_eager"] = round(psnr_db(firsts["d_pairforge_fast"],
                                                                         firsts["c_pairforge_eager"]), 2)
    out["psnr_db_first_batch"] = quality
    out["psnr_rule"] = (f"a numerics change (fewer steps, step caching, fp8) counts only at >= {PSNR_MIN_DB:g} dB vs "
                        "the bf16 reference with the same seeds; none is used here (compile, CUDA graphs, layout "
                        "and fusion change rounding only). b_diffusers_fp16 vs bf16 shows the spread two valid "
                        "half precisions give on these random-weight models.")
    out["competent_baseline_images_per_s"] = best_b
    out["reference_images_per_s"] = ref
    out["total_s"] = round(time.perf_counter() - t_start, 1)

    print()
    print(f"device: {out['device']}   torch {torch.__version__}   {size}x{size}, {steps} PNDM steps, batch {bs}")
    print(f"{'configuration':24s} {'images/s':>9s} {'vs b':>6s} {'TFLOP/s':>8s} {'% peak':>7s}")
    for k in CONFIGS:
        rec = C.get(k)
        if rec is None:
            continue
        if "images_per_s" not in rec:
            print(f"{k:24s} {rec.get('error') or rec.get('skipped') or rec}"[:200])
            continue
        print(f"{k:24s} {rec['images_per_s']:9.3f} {rec.get('vs_competent_diffusers', float('nan')):6.2f} "
              f"{rec.get('tflops', float('nan')):8.2f} {rec.get('pct_of_bf16_peak', float('nan')):7.1f}")
    if flops:
        print(f"UNet + ControlNet: {flops / 1e9:.1f} GFLOP per CFG step (per image); peak: {peak_note}")
    for k, v in quality.items():
        print(f"PSNR {k}: {v:.1f} dB")
    if args.tiny:
        print("smoke run: not a performance number")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
