"""The ``controlnet`` render backend: a local diffusers base model (SD 1.5 or SDXL family) and one or more
ControlNets turn a layout's label map into an image that stays pixel-aligned with the label (CT: float32 HU;
surface: uint8 grey or RGB).

Owns, top to bottom: option checks and every refusal (done in ``__init__``, before any weight is read), resolving
weight folders (local folder, or a repo id in the local Hugging Face cache; never a download unless
``allow_download: true``; safetensors only), the per-process model cache, prompts from the placed findings, the
pad-generate-crop around the SD size grid, batching with one ``torch.Generator`` per sample, and the grey -> HU
mapping. Control images come from ``generators.conditioning``. See docs/controlnet.md.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import string
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generators.conditioning import (ANNOTATORS, CANNY_HIGH, CANNY_LOW, CONDITIONINGS, LINEART_SIGMA,
                                     LINEART_THRESHOLD, PAD_MODE, control_image, pad_label, padded_size, palette_lut)
from generators.base import Renderer, register_renderer
from schemas.domain import all_domains, get_domain, import_hook
from schemas.errors import GenerationError, SpecError
from schemas.sample import Layout
from schemas.seeding import torch_seed

# ------------------------------------------------------------------------------------------------ options
SCHEDULERS = ("ddim", "dpm++", "euler", "euler_a", "unipc", "pndm", "ddpm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_NEGATIVE = "blurry, low quality, text, watermark, letters, frame, border, artifacts"
NET_KEYS = ("path", "conditioning", "scale", "annotator")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DOWNLOAD_PATTERNS = ["*.json", "*.txt", "*.safetensors"]  # what allow_download fetches: configs, vocab, safetensors
MIN_LATENT_SIDE = 8  # below 8 latent pixels the SD UNet's bottom level is a single pixel or less
MAX_SIZE_NATIVE_FACTOR = 4  # default largest side: 4x the model's native size (SD 1.5: 2048 px, SDXL: 4096 px)
MAX_SIZE_HARD = 8192
MAX_AUTO_BATCH = 16
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Where torch.compile keeps its compiled kernels between processes (Inductor's FX-graph and autotuning caches, Triton
# binaries), so a machine pays the full compile once, not once per build or per worker.
DEFAULT_COMPILE_CACHE = "~/.cache/pairforge/torch-compile"
# ControlNet and base UNet must agree on these (compared from config.json before any weight is read).
MATCH_KEYS = ("in_channels", "block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim",
              "attention_head_dim", "num_attention_heads", "transformer_layers_per_block", "use_linear_projection",
              "norm_num_groups", "class_embed_type", "addition_embed_type", "addition_time_embed_dim",
              "projection_class_embeddings_input_dim", "encoder_hid_dim", "encoder_hid_dim_type")


@dataclass(frozen=True)
class NetOptions:
    path: str
    conditioning: str
    scale: float
    annotator: str


@dataclass(frozen=True)
class ModelFolders:
    """Resolved, checked weight folders and what the configs say about them (no weights read yet)."""

    family: str  # "sd" or "sdxl"
    base: Path
    controlnets: tuple[Path, ...]
    vae_scale: int
    size_multiple: int
    native_size: int
    base_fingerprint: dict
    net_fingerprints: tuple[dict, ...]


def _as_int(name: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise SpecError(f"option {name}: {v!r} is not accepted; accepted: an integer from {lo} to {hi}")
    return v


def _as_float(name: str, v: Any, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= float(v) <= hi:
        raise SpecError(f"option {name}: {v!r} is not accepted; accepted: a number from {lo:g} to {hi:g}")
    return float(v)


def _as_bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise SpecError(f"option {name}: {v!r} is not accepted; accepted: true or false")
    return v


def _choice(name: str, v: Any, accepted: tuple[str, ...]) -> str:
    if v not in accepted:
        raise SpecError(f"option {name}: {v!r} is not accepted; accepted: {', '.join(accepted)}")
    return v


def _parse_nets(v: Any, default_annotator: str) -> tuple[NetOptions, ...]:
    if not isinstance(v, list) or not v:
        raise SpecError("option controlnets: give a non-empty list like [{path: /models/cn-seg, conditioning: "
                        "segmentation, scale: 1.0}]")
    nets = []
    for i, n in enumerate(v):
        if isinstance(n, str):
            raise SpecError(f"option controlnets[{i}]: {n!r} needs a mapping with path and conditioning; "
                            f"accepted keys: {', '.join(NET_KEYS)}")
        if not isinstance(n, dict):
            raise SpecError(f"option controlnets[{i}]: a mapping is needed; accepted keys: {', '.join(NET_KEYS)}")
        unknown = sorted(set(n) - set(NET_KEYS))
        if unknown:
            raise SpecError(f"option controlnets[{i}]: unknown key(s) {', '.join(unknown)}; "
                            f"accepted: {', '.join(NET_KEYS)}")
        if not isinstance(n.get("path"), str) or not n["path"]:
            raise SpecError(f"option controlnets[{i}].path: a folder or a Hugging Face repo id is required")
        nets.append(NetOptions(
            path=n["path"],
            conditioning=_choice(f"controlnets[{i}].conditioning", n.get("conditioning"), CONDITIONINGS),
            scale=_as_float(f"controlnets[{i}].scale", n.get("scale", 1.0), 0.0, 5.0),
            annotator=_choice(f"controlnets[{i}].annotator", n.get("annotator", default_annotator), ANNOTATORS)))
    return tuple(nets)


def controlnet_hooks(domain: str) -> Any:
    """The domain's ControlNet hooks (``CONTROLNET`` in the module its description names): default prompt and its
    placeholders, domain options, the image size of a spec, prompt fields of a layout, and RGB -> domain image."""
    d = get_domain(domain)
    hooks = import_hook(d, d.controlnet_module, "CONTROLNET")
    if hooks is None:
        raise SpecError(f"generator 'controlnet' cannot render domain {domain!r}: its description names no ControlNet "
                        "hooks (controlnet_module)")
    return hooks


def __getattr__(name: str):
    """Domain-specific names that moved to the domains' generator modules (e.g. ``describe_ct_finding``)."""
    if name.startswith("__"):
        raise AttributeError(name)
    import importlib

    for d in all_domains():
        if d.controlnet_module:
            mod = importlib.import_module(d.controlnet_module)
            if name in vars(mod):
                return vars(mod)[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_prompt(name: str, text: Any, domain: str, fields_accepted: frozenset[str]) -> str:
    if not isinstance(text, str):
        raise SpecError(f"option {name}: a text is required")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as e:
        raise SpecError(f"option {name}: {e} (write literal braces as {{{{ and }}}})") from None
    bad = sorted(fields - fields_accepted)
    if bad:
        raise SpecError(f"option {name}: unknown placeholder(s) {', '.join('{' + b + '}' for b in bad)}; accepted for "
                        f"{domain}: {', '.join('{' + f + '}' for f in sorted(fields_accepted))}")
    return text


def _resolve_device(v: Any) -> torch.device:
    if v == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(v, str) and v == "cpu":
        return torch.device("cpu")
    if isinstance(v, str) and re.fullmatch(r"cuda(:\d+)?", v):
        dev = torch.device(v)
        if not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count():
            raise SpecError(f"option device: {v!r} asks for a CUDA GPU that this machine does not have "
                            f"({torch.cuda.device_count()} visible); accepted: auto, cpu, cuda, cuda:N")
        return dev
    raise SpecError(f"option device: {v!r} is not accepted; accepted: auto, cpu, cuda, cuda:N")


def _resolve_dtype(v: Any, device: torch.device) -> torch.dtype:
    v = _choice("dtype", v, ("auto",) + tuple(DTYPES))
    if v == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if v == "float16" and device.type == "cpu":
        raise SpecError("option dtype: float16 is not supported on the CPU (many half-precision CPU kernels are "
                        "missing or slow); accepted on CPU: auto, float32, bfloat16")
    return DTYPES[v]


# -------------------------------------------------------------------------------------- weight folders
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safetensors_header(path: Path) -> bytes:
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SpecError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > 100_000_000:
            raise SpecError(f"{path} is not a safetensors file (header length {n} is implausible)")
        return head + f.read(n)


_FILE_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: hash big files once per process


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def fingerprint(folder: Path, components: tuple[str, ...], source: str, hash_weights: bool) -> dict:
    """sha256 of every config/vocabulary file and of every safetensors header (the tensor index: names, dtypes,
    shapes, offsets) -- or of the whole weight files with ``hash_weights`` -- folded into one digest."""
    files = {}
    for comp in components:
        d = folder / comp if comp else folder
        for f in sorted(d.iterdir()):
            rel = f"{comp}/{f.name}" if comp else f.name
            if f.suffix in (".json", ".txt"):
                files[rel] = _sha256(f.read_bytes())
            elif f.suffix == ".safetensors":
                files[rel] = _file_sha256(f) if hash_weights else _sha256(_safetensors_header(f))
    return {"name": folder.name, "source": source, "weights_hashed": "full" if hash_weights else "header",
            "sha256": _sha256(json.dumps(files, sort_keys=True).encode())}


def resolve_folder(source: str, what: str, allow_download: bool) -> Path:
    """A local folder for ``source``: the folder itself, or a repo id resolved in the local Hugging Face cache
    (``local_files_only=True``); downloads (configs, vocabularies and safetensors only) need ``allow_download``."""
    p = Path(source).expanduser()
    if p.is_file():
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise SpecError(f"{what} {source!r} is a pickle checkpoint; pairforge loads safetensors only because "
                            "unpickling a file can execute arbitrary code; convert it to a diffusers folder with "
                            ".safetensors weights")
        raise SpecError(f"{what} {source!r} is a single file; give a diffusers-format folder (config.json + "
                        ".safetensors per component, as written by save_pretrained(..., safe_serialization=True))")
    if p.is_dir():
        return p.resolve()
    if REPO_ID.match(source) and not source.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(source, local_files_only=not allow_download,
                                          allow_patterns=DOWNLOAD_PATTERNS))
        except LocalEntryNotFoundError:
            raise SpecError(f"{what} {source!r} is not a folder and not in the local Hugging Face cache; download it "
                            "yourself or set allow_download: true (pairforge never downloads unasked)") from None
        except Exception as e:  # network, auth, unknown repo: one readable line
            raise SpecError(f"{what} {source!r} could not be fetched: {type(e).__name__}: {e}") from None
    raise SpecError(f"{what} folder {source!r} does not exist")


def check_weights(folder: Path, stem: str, what: str) -> None:
    """``folder`` must hold ``{stem}.safetensors`` (or its sharded index); pickle-only folders are refused."""
    if not folder.is_dir():
        raise SpecError(f"{what}: folder {str(folder)!r} is missing")
    if (folder / f"{stem}.safetensors").is_file() or (folder / f"{stem}.safetensors.index.json").is_file():
        return
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise SpecError(f"{what} in {str(folder)!r} has only pickle weights ({', '.join(pickles)}); pairforge loads "
                        "safetensors only because unpickling a checkpoint can execute arbitrary code; convert it "
                        "(load once in a trusted sandbox, save_pretrained(..., safe_serialization=True))")
    others = sorted(f.name for f in folder.glob("*.safetensors"))
    if others:
        raise SpecError(f"{what} in {str(folder)!r} has {', '.join(others)} but not {stem}.safetensors (variant files "
                        "such as fp16 are not loaded); rename or re-save the weights")
    raise SpecError(f"{what} in {str(folder)!r} has no {stem}.safetensors weights")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise SpecError(f"{what}: {str(path)!r} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SpecError(f"{what}: {str(path)!r} is not readable JSON ({e})") from None


def _per_block(v: Any, n: int) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(v)
    return tuple([v] * n) if isinstance(v, int) and not isinstance(v, bool) else v


def check_controlnet_matches(unet_cfg: dict, net_cfg: dict, vae_scale: int, what: str) -> None:
    """Refuse a ControlNet built for another base (compared on configs, before any shape error can happen)."""
    n = len(unet_cfg.get("block_out_channels", ()))
    for key in MATCH_KEYS:
        if key in unet_cfg and key in net_cfg:
            a, b = _per_block(unet_cfg[key], n), _per_block(net_cfg[key], n)
            if key == "num_attention_heads" and (a is None or b is None):
                continue  # None means "use attention_head_dim", which is compared on its own
            if a != b:
                raise SpecError(f"{what} does not fit the base model: {key} is {net_cfg[key]!r} in the ControlNet but "
                                f"{unet_cfg[key]!r} in the base UNet; use a ControlNet trained for this base model")
    emb = net_cfg.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
    factor = 2 ** (len(emb) - 1)
    if factor != vae_scale:
        raise SpecError(f"{what} does not fit the base model: its conditioning embedding downsamples by {factor} but "
                        f"the base VAE by {vae_scale}")
    if net_cfg.get("conditioning_channels", 3) != 3:
        raise SpecError(f"{what} takes {net_cfg['conditioning_channels']}-channel control images; pairforge makes "
                        "3-channel (RGB) control images")


def check_folders(base_source: str, nets: tuple[NetOptions, ...], allow_download: bool,
                  hash_weights: bool) -> ModelFolders:
    base = resolve_folder(base_source, "base_model", allow_download)
    index = _read_json(base / "model_index.json", f"base_model {base_source!r} (not a diffusers pipeline folder)")
    family = "sdxl" if ("XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index) else "sd"
    encoders = ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",)
    tokenizers = ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",)
    for comp in ("unet", "vae"):
        check_weights(base / comp, "diffusion_pytorch_model", f"base_model {comp}")
    for comp in encoders:
        check_weights(base / comp, "model", f"base_model {comp}")
    for comp in tokenizers:
        d = base / comp
        if not ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()) and not (d / "tokenizer.json").is_file():
            raise SpecError(f"base_model {comp}: {str(d)!r} has no vocab.json + merges.txt (or tokenizer.json)")
    _read_json(base / "scheduler" / "scheduler_config.json", "base_model scheduler")
    unet_cfg = _read_json(base / "unet" / "config.json", "base_model unet")
    vae_cfg = _read_json(base / "vae" / "config.json", "base_model vae")
    vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", (1, 1, 1, 1))) - 1)
    unet_factor = 2 ** (len(unet_cfg.get("block_out_channels", (1, 1, 1, 1))) - 1)
    multiple = math.lcm(64, vae_scale * unet_factor)
    native = int(unet_cfg.get("sample_size", 64)) * vae_scale
    net_paths, net_prints = [], []
    for i, net in enumerate(nets):
        what = f"controlnets[{i}] {net.path!r}"
        folder = resolve_folder(net.path, f"controlnets[{i}]", allow_download)
        cfg = _read_json(folder / "config.json", what)
        if cfg.get("_class_name") != "ControlNetModel":
            raise SpecError(f"{what} is a {cfg.get('_class_name')!r}; accepted: a diffusers ControlNetModel folder")
        check_weights(folder, "diffusion_pytorch_model", what)
        check_controlnet_matches(unet_cfg, cfg, vae_scale, what)
        net_paths.append(folder)
        net_prints.append(fingerprint(folder, ("",), net.path, hash_weights))
    comps = ("unet", "vae", "scheduler") + encoders + tokenizers
    return ModelFolders(family=family, base=base, controlnets=tuple(net_paths), vae_scale=vae_scale,
                        size_multiple=multiple, native_size=native,
                        base_fingerprint=fingerprint(base, comps, base_source, hash_weights),
                        net_fingerprints=tuple(net_prints))


# ------------------------------------------------------------------------------- loading (one per process)
def _row(x: Any, i: int, n: int) -> Any:
    if isinstance(x, torch.Tensor):
        return x[i:i + 1] if x.ndim and x.shape[0] == n else x
    if isinstance(x, dict):
        return type(x)({k: _row(v, i, n) for k, v in x.items()})
    if isinstance(x, (list, tuple)):
        return type(x)(_row(v, i, n) for v in x)
    return x


def _cat(rows: list) -> Any:
    r0 = rows[0]
    if isinstance(r0, torch.Tensor):
        return torch.cat(rows)
    if isinstance(r0, dict):  # diffusers BaseOutput / transformers ModelOutput
        return type(r0)(**{k: _cat([r[k] for r in rows]) for k in r0.keys()})
    if isinstance(r0, (list, tuple)):
        return type(r0)(_cat(list(z)) for z in zip(*rows))
    return r0


def make_rowwise(module: torch.nn.Module) -> None:
    """Evaluate ``module`` one batch row at a time. CPU kernels (oneDNN convolutions, small-M GEMMs, channels-last
    GroupNorm) sum in an order that depends on the batch size; row by row, sample k's numbers are the same alone
    and in any batch. The denoising loop, generators and scheduler still run batched."""
    forward = module.forward

    def rowwise_forward(*args, **kwargs):
        first = args[0] if args else kwargs.get("sample", kwargs.get("input_ids"))
        n = first.shape[0]
        if n == 1:
            return forward(*args, **kwargs)
        return _cat([forward(*_row(args, i, n), **_row(kwargs, i, n)) for i in range(n)])

    module.forward = rowwise_forward


@dataclass
class LoadedModels:
    family: str
    vae: Any
    unet: Any
    text_encoders: tuple
    tokenizers: tuple
    controlnets: tuple
    scheduler_config: dict


_MODEL_CACHE: dict[tuple, LoadedModels] = {}


@dataclass(frozen=True)
class SpeedOptions:
    """How the networks are run (none of it changes what is computed, only rounding and speed)."""

    compile: bool = False
    compile_mode: str = "default"  # reduce-overhead / max-autotune: CUDA graphs through Inductor's graph trees
    compile_cache: str | None = None  # persistent Inductor/Triton cache folder (None: torch's own default)
    compile_backend: str = "inductor"  # "eager": Dynamo tracing only (checks the compiled path without a compiler)
    channels_last: bool = False
    fuse_qkv: bool = False  # one matmul for Q, K and V in every self-attention (diffusers' fuse_qkv_projections)


def use_compile_cache(folder: str) -> Path:
    """Point Inductor and Triton at a persistent cache folder (before anything is compiled in this process)."""
    import os

    path = Path(folder).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path))
    os.environ.setdefault("TRITON_CACHE_DIR", str(path / "triton"))
    try:
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
        inductor_config.autotune_local_cache = True
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        pass
    return path


def load_models(folders: ModelFolders, dtype: torch.dtype, device: torch.device, compile_models: bool,
                batch_invariant: bool, speed: SpeedOptions | None = None) -> LoadedModels:
    """Load (once per process and key) every model from safetensors, placed and set up for speed."""
    speed = speed or SpeedOptions(compile=compile_models, channels_last=device.type == "cuda" and compile_models)
    key = (folders.family, str(folders.base), tuple(map(str, folders.controlnets)), str(dtype), str(device),
           batch_invariant, speed)
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    base = folders.base
    common = dict(use_safetensors=True, local_files_only=True, torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **common)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **common)
    nets = tuple(ControlNetModel.from_pretrained(p, **common) for p in folders.controlnets)
    encoders = [CLIPTextModel.from_pretrained(base / "text_encoder", use_safetensors=True, local_files_only=True,
                                              dtype=dtype)]
    tokenizers = [CLIPTokenizer.from_pretrained(base / "tokenizer", local_files_only=True)]
    if folders.family == "sdxl":
        encoders.append(CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2", use_safetensors=True,
                                                                    local_files_only=True, dtype=dtype))
        tokenizers.append(CLIPTokenizer.from_pretrained(base / "tokenizer_2", local_files_only=True))
    scheduler_config = json.loads((base / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    for m in (unet, vae, *nets, *encoders):
        m.to(device).eval().requires_grad_(False)
    for m in (unet, vae, *nets):
        m.set_attn_processor(AttnProcessor2_0())  # PyTorch SDPA (flash / memory-efficient kernels on GPU)
        # NHWC pays off in compiled graphs (convolutions without layout copies); in eager CUDA GroupNorm copies it
        # back to NCHW around every norm, so it is on with compile only (or when asked).
        if speed.channels_last:
            m.to(memory_format=torch.channels_last)
    if speed.fuse_qkv:
        for m in (unet, *nets):
            m.fuse_qkv_projections()
    if batch_invariant or device.type != "cuda":
        vae.enable_slicing()  # decode one image at a time: bounded memory, and per-sample numbers
    if batch_invariant:
        for m in (unet, *nets, *encoders):
            make_rowwise(m)
    if speed.compile:
        if speed.compile_cache:
            use_compile_cache(speed.compile_cache)
        # Static shapes (render_batch pads every call to one batch size): one graph, no dynamic-shape kernels.
        for m in (unet, *nets):
            if speed.compile_backend == "inductor":
                m.compile(mode=speed.compile_mode, dynamic=False)
            else:
                m.compile(backend=speed.compile_backend, dynamic=False)
    models = LoadedModels(family=folders.family, vae=vae, unet=unet, text_encoders=tuple(encoders),
                          tokenizers=tuple(tokenizers), controlnets=nets, scheduler_config=scheduler_config)
    _MODEL_CACHE[key] = models
    return models


def make_scheduler(name: str, config: dict):
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)

    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
           "unipc": UniPCMultistepScheduler, "pndm": PNDMScheduler, "ddpm": DDPMScheduler}[name]
    return cls.from_config(config)


def make_pipeline(models: LoadedModels, scheduler_name: str):
    """A diffusers ControlNet pipeline over the cached models, with this renderer's own scheduler."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    nets = models.controlnets[0] if len(models.controlnets) == 1 else list(models.controlnets)
    scheduler = make_scheduler(scheduler_name, models.scheduler_config)
    if models.family == "sdxl":
        pipe = StableDiffusionXLControlNetPipeline(
            vae=models.vae, text_encoder=models.text_encoders[0], text_encoder_2=models.text_encoders[1],
            tokenizer=models.tokenizers[0], tokenizer_2=models.tokenizers[1], unet=models.unet, controlnet=nets,
            scheduler=scheduler, add_watermarker=False)  # the store watermarks; never twice
    else:
        pipe = StableDiffusionControlNetPipeline(
            vae=models.vae, text_encoder=models.text_encoders[0], tokenizer=models.tokenizers[0], unet=models.unet,
            controlnet=nets, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------- prompts
def build_prompt(template: str, domain: str, layout: Layout, state: dict[str, Any]) -> str:
    """The template filled with the domain's fields for this layout (findings described, material, window...)."""
    return template.format(**controlnet_hooks(domain).prompt_fields_for(layout, state))


# ------------------------------------------------------------------------------------------ renderer
@register_renderer
class ControlNetRenderer(Renderer):
    """Label map -> control image(s) -> diffusers ControlNet pipeline -> cropped, domain-typed image. Serves every
    domain whose description lists it in ``renderers`` and names ControlNet hooks."""

    name = "controlnet"
    version = "1"
    domains = ("*",)
    options_accepted = ("base_model", "controlnets", "prompt", "negative_prompt", "steps", "guidance_scale",
                        "scheduler", "dtype", "device", "batch_size", "compile", "allow_download", "hu_window", "color",
                        "max_size", "batch_invariant", "hash_weights", "annotator", "compile_mode", "compile_cache",
                        "channels_last", "fuse_qkv", "overlap", "compile_backend")

    def __init__(self, domain: str, options: dict[str, Any] | None = None):
        super().__init__(domain, options)
        o = self.options
        if "base_model" not in o or not isinstance(o["base_model"], str) or not o["base_model"]:
            raise SpecError("option base_model is required: a diffusers-format folder (or a repo id in the local "
                            "Hugging Face cache) of an SD 1.5 or SDXL family model")
        if "controlnets" not in o:
            raise SpecError("option controlnets is required: a list like [{path: /models/cn-seg, conditioning: "
                            "segmentation, scale: 1.0}]")
        annotator = _choice("annotator", o.get("annotator", "controlnet_aux"), ANNOTATORS)
        self.nets = _parse_nets(o["controlnets"], annotator)
        self.hooks = controlnet_hooks(domain)
        self.prompt = _check_prompt("prompt", o.get("prompt", self.hooks.default_prompt), domain,
                                    self.hooks.prompt_fields)
        self.negative_prompt = _check_prompt("negative_prompt", o.get("negative_prompt", DEFAULT_NEGATIVE), domain,
                                             self.hooks.prompt_fields)
        self.steps = _as_int("steps", o.get("steps", 20), 1, 1000)
        self.guidance_scale = _as_float("guidance_scale", o.get("guidance_scale", 7.5), 0.0, 50.0)
        self.scheduler = _choice("scheduler", o.get("scheduler", "unipc"), SCHEDULERS)
        self.device = _resolve_device(o.get("device", "auto"))
        self.dtype = _resolve_dtype(o.get("dtype", "auto"), self.device)
        bs = o.get("batch_size", "auto")
        if bs != "auto" and (isinstance(bs, bool) or not isinstance(bs, int) or not 1 <= bs <= 1024):
            raise SpecError(f"option batch_size: {bs!r} is not accepted; accepted: auto or an integer from 1 to 1024")
        self.batch_size = bs
        self.compile = _as_bool("compile", o.get("compile", False))
        mode = _choice("compile_mode", o.get("compile_mode", "default"), COMPILE_MODES)
        cache = o.get("compile_cache", DEFAULT_COMPILE_CACHE)
        if cache is not None and (not isinstance(cache, str) or not cache):
            raise SpecError(f"option compile_cache: {cache!r} is not accepted; accepted: a folder path, or null for "
                            "torch's own per-user temporary cache")
        cl = o.get("channels_last", "auto")
        fq = o.get("fuse_qkv", "auto")
        backend = _choice("compile_backend", o.get("compile_backend", "inductor"), ("inductor", "eager"))
        if (mode != "default" or "compile_cache" in o or "compile_backend" in o) and not self.compile:
            raise SpecError("options compile_mode, compile_cache and compile_backend need compile: true")
        if mode in ("reduce-overhead", "max-autotune") and self.device.type != "cuda":
            raise SpecError(f"option compile_mode {mode!r} records CUDA graphs and needs a CUDA device; accepted on "
                            "the CPU: default, max-autotune-no-cudagraphs")
        self.speed = SpeedOptions(
            compile=self.compile, compile_mode=mode, compile_cache=cache if self.compile else None,
            compile_backend=backend,
            channels_last=(self.compile and self.device.type == "cuda") if cl == "auto"
            else _as_bool("channels_last", cl),
            fuse_qkv=(self.compile and self.device.type == "cuda") if fq == "auto" else _as_bool("fuse_qkv", fq))
        # Control images and prompts of the next batch, and the crop/convert of the last, run on a CPU thread while
        # the GPU denoises: on by default on CUDA, where the GPU call leaves the CPU idle.
        ov = o.get("overlap", "auto")
        self.overlap = (self.device.type == "cuda") if ov == "auto" else _as_bool("overlap", ov)
        allow_download = _as_bool("allow_download", o.get("allow_download", False))
        hash_weights = _as_bool("hash_weights", o.get("hash_weights", False))
        bi = o.get("batch_invariant", "auto")
        self.batch_invariant = (self.device.type == "cpu") if bi == "auto" else _as_bool("batch_invariant", bi)
        self.state = self.hooks.configure(o)  # domain options (e.g. an HU window, a colour mode), checked
        try:
            lut, known = palette_lut(domain)
        except (KeyError, ValueError, ImportError) as e:
            raise SpecError(f"the {domain} segmentation palette is not usable: {e}") from None
        self.palette_sha256 = _sha256(lut.tobytes() + known.tobytes())
        self.folders = check_folders(o["base_model"], self.nets, allow_download, hash_weights)
        self.min_size = MIN_LATENT_SIDE * self.folders.vae_scale
        default_max = min(MAX_SIZE_HARD, MAX_SIZE_NATIVE_FACTOR * self.folders.native_size)
        self.max_size = _as_int("max_size", o.get("max_size", default_max), self.min_size, MAX_SIZE_HARD)
        if self.device.type == "cpu":
            warnings.warn("controlnet backend: no CUDA GPU in use; running on the CPU in "
                          f"{str(self.dtype).removeprefix('torch.')} (slow; fine for tests and previews)", stacklevel=2)
        self._pipe = None

    # ---- checks against the spec (called by the pipeline before anything is generated)
    def check_spec(self, spec: Any) -> None:
        h, w = self.hooks.image_size(spec, self.options, self.state)
        self.check_size(h, w)

    def check_size(self, height: int, width: int) -> None:
        """Refuse a label size the model cannot take, before anything is generated."""
        if min(height, width) < self.min_size:
            raise SpecError(f"image size {height}x{width} is below the {self.min_size} px this base model's VAE can "
                            f"take ({MIN_LATENT_SIDE} latent pixels x {self.folders.vae_scale}); accepted: sides from "
                            f"{self.min_size} to {self.max_size} px")
        if max(height, width) > self.max_size:
            raise SpecError(f"image size {height}x{width} is above the {self.max_size} px max_size of the controlnet "
                            f"backend for this model (native {self.folders.native_size} px); accepted: sides from "
                            f"{self.min_size} to {self.max_size} px, or raise option max_size "
                            f"(at most {MAX_SIZE_HARD})")

    # ---- one sample's inputs: padded label, control images, prompt
    def control_images(self, label: np.ndarray) -> tuple[list[np.ndarray], tuple[int, int]]:
        padded, pad = pad_label(label, self.folders.size_multiple)
        return [control_image(n.conditioning, padded, self.domain, n.annotator) for n in self.nets], pad

    def prompt_for(self, layout: Layout) -> tuple[str, str]:
        return (build_prompt(self.prompt, self.domain, layout, self.state),
                build_prompt(self.negative_prompt, self.domain, layout, self.state))

    def pipeline(self):
        if self._pipe is None:
            models = load_models(self.folders, self.dtype, self.device, self.compile, self.batch_invariant,
                                 self.speed)
            self._pipe = make_pipeline(models, self.scheduler)
        return self._pipe

    def auto_batch_size(self, height: int, width: int) -> int:
        """Samples per pipeline call. On GPU: from free memory with a conservative per-image estimate (about 1.2 GB
        for a 512x512 SD-1.5 image with CFG in 16-bit, scaled by pixels, dtype size, ControlNets and SDXL)."""
        if self.batch_size != "auto":
            return self.batch_size
        if self.device.type != "cuda":
            return 4
        free, _ = torch.cuda.mem_get_info(self.device)
        per_image = 1.2e9 * (height * width) / 512 ** 2 * (torch.finfo(self.dtype).bits / 16)
        per_image *= (1 + 0.5 * len(self.nets)) / 1.5 * (2.5 if self.folders.family == "sdxl" else 1.0)
        per_image *= 1.0 if self.guidance_scale > 1 else 0.5
        return max(1, min(MAX_AUTO_BATCH, int(0.8 * free // per_image)))

    def render(self, layout: Layout, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        return self.render_batch([layout], [rng])[0]

    def render_batch(self, layouts: list[Layout], rngs: list[np.random.Generator]) -> list[tuple[np.ndarray, dict]]:
        if len(layouts) != len(rngs):
            raise ValueError(f"{len(layouts)} layouts but {len(rngs)} rngs")
        if not layouts:
            return []
        for lay in layouts:
            self.check_size(*lay.label.shape[:2])
        # Each sample draws its torch seed from its own rng, exactly as it would alone.
        seeds = [torch_seed(rng) for rng in rngs]
        pipe = self.pipeline()
        # Group by padded size (one pipeline call needs one size), then chunk by batch size; order is kept.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, lay in enumerate(layouts):
            groups.setdefault(padded_size(*lay.label.shape[:2], self.folders.size_multiple), []).append(i)
        chunks = []
        for (hp, wp), idx in groups.items():
            bs = self.auto_batch_size(hp, wp)
            chunks.extend(((hp, wp), bs, idx[s:s + bs]) for s in range(0, len(idx), bs))
        out: list[tuple[np.ndarray, dict] | None] = [None] * len(layouts)

        def prepare(chunk: list[int]) -> list[dict]:
            jobs = []
            for i in chunk:
                controls, pad = self.control_images(layouts[i].label)
                jobs.append({"layout": layouts[i], "seed": seeds[i], "controls": controls, "pad": pad,
                             "prompts": self.prompt_for(layouts[i])})
            return jobs

        def finish(chunk: list[int], jobs: list[dict], images: np.ndarray, padded: tuple[int, int], bs: int) -> None:
            for i, job, img in zip(chunk, jobs, images):
                out[i] = self._finish(img, job, padded, bs)

        if not self.overlap:
            for padded, bs, chunk in chunks:
                jobs = prepare(chunk)
                finish(chunk, jobs, self._generate(pipe, jobs, *padded, bs), padded, bs)
            return out  # type: ignore[return-value]
        # One CPU thread prepares batch k+1 and finishes batch k while the GPU denoises (submitted in that order).
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="controlnet-cpu") as cpu:
            nxt = cpu.submit(prepare, chunks[0][2])
            finishing = []
            for k, (padded, bs, chunk) in enumerate(chunks):
                jobs = nxt.result()
                if k + 1 < len(chunks):
                    nxt = cpu.submit(prepare, chunks[k + 1][2])
                images = self._generate(pipe, jobs, *padded, bs)
                finishing.append(cpu.submit(finish, chunk, jobs, images, padded, bs))
            for f in finishing:
                f.result()
        return out  # type: ignore[return-value]

    def _generate(self, pipe, jobs: list[dict], hp: int, wp: int, batch_size: int | None = None) -> np.ndarray:
        n = len(jobs)
        if self.compile and batch_size and n < batch_size:
            # Compiled graphs (and CUDA graphs) are built for one batch shape: pad a short last batch with copies of
            # its last job instead of compiling again; the copies' images are dropped.
            jobs = jobs + [jobs[-1]] * (batch_size - n)
        generators = [torch.Generator("cpu").manual_seed(j["seed"]) for j in jobs]  # CPU noise: same on any device
        per_net = [torch.from_numpy(np.stack([j["controls"][k] for j in jobs])).permute(0, 3, 1, 2).float() / 255.0
                   for k in range(len(self.nets))]
        scales = [n.scale for n in self.nets]
        tiling = max(hp, wp) > 2 * self.folders.native_size  # VAE tiling only where a full decode would not fit
        (pipe.vae.enable_tiling if tiling else pipe.vae.disable_tiling)()
        result = pipe(prompt=[j["prompts"][0] for j in jobs], negative_prompt=[j["prompts"][1] for j in jobs],
                      image=per_net[0] if len(per_net) == 1 else per_net, height=hp, width=wp,
                      num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                      controlnet_conditioning_scale=scales[0] if len(scales) == 1 else scales,
                      generator=generators, output_type="np")
        images = np.asarray(result.images, dtype=np.float32)[:n]
        if not np.isfinite(images).all():
            raise GenerationError(f"the {str(self.dtype).removeprefix('torch.')} pipeline produced NaN/inf pixels "
                                  "(half-precision overflow?); use dtype bfloat16 or float32")
        return images

    def _finish(self, rgb: np.ndarray, job: dict, padded: tuple[int, int], batch_size: int):
        lay: Layout = job["layout"]
        h, w = lay.label.shape[:2]
        rgb = np.clip(rgb[:h, :w], 0.0, 1.0)  # crop the pad away: pixel (y, x) is label pixel (y, x)
        image, output = self.hooks.to_image(rgb, self.state)
        params = {
            "backend": self.name, "seed": job["seed"], "prompt": job["prompts"][0],
            "negative_prompt": job["prompts"][1], "steps": self.steps, "guidance_scale": self.guidance_scale,
            "scheduler": self.scheduler, "dtype": str(self.dtype).removeprefix("torch."), "device": self.device.type,
            "batch_invariant": self.batch_invariant, "batch_size": batch_size, "compile": self.compile,
            **({"compile_mode": self.speed.compile_mode} if self.compile else {}),
            "family": self.folders.family, "base_model": self.folders.base_fingerprint,
            "controlnets": [{**fp, "conditioning": n.conditioning, "scale": n.scale, "annotator": n.annotator}
                            for n, fp in zip(self.nets, self.folders.net_fingerprints)],
            "palette_sha256": self.palette_sha256, "canny_thresholds": [CANNY_LOW, CANNY_HIGH],
            "lineart": {"sigma": LINEART_SIGMA, "threshold": LINEART_THRESHOLD},
            "pad": {"bottom": job["pad"][0], "right": job["pad"][1], "mode": PAD_MODE, "padded_size": list(padded)},
            "vae_tiling": max(padded) > 2 * self.folders.native_size, "output": output,
            "versions": {"torch": torch.__version__, "diffusers": _diffusers_version()},
        }
        return image, params


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
