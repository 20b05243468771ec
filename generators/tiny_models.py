"""Tiny random-weight diffusers model folders for CPU tests and benchmark smoke runs (no network): an SD-1.5-shaped
base pipeline, an SDXL-shaped one and ControlNets, saved as safetensors exactly as a user's local folders would be.

Every weight comes from a seeded ``torch.Generator`` (no global random state), so two builds are identical. torch,
diffusers and transformers are imported by the functions that need them, not by importing this module.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Small enough to run a few denoising steps at 64-128 px in a fraction of a second on one core.
TINY_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
TINY_VAE = dict(
    # Four blocks: the SD downsampling factor of 8, so sizes, pads and limits behave as with real SD models.
    block_out_channels=(8, 16, 16, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
    layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=256,
)
TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                 max_position_embeddings=77, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of GPT-2/CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_clip_tokenizer(folder: Path) -> int:
    """A CLIP BPE tokenizer over single characters plus a few merges; returns the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges = ["c t</w>", "l u", "n o", "lu ng</w>", "n g</w>"]
    for m in merges:
        merged = m.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}), encoding="utf-8")
    return len(vocab)


def _randomise(module: "torch.nn.Module", seed: int) -> None:
    """Deterministic small random weights from a private generator (zero-initialised ControlNet convs included,
    so the control path really changes the output)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)


def _save_pipeline(pipe, folder: Path, tok_dir: Path) -> Path:
    """Save a pipeline in diffusers format and drop the tokenizer source folder it was built from."""
    pipe.save_pretrained(folder, safe_serialization=True)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return folder


def build_tiny_base(folder: str | Path, *, unet_overrides: dict | None = None, seed: int = 0) -> Path:
    """A diffusers-format SD-1.5-style pipeline folder (unet, vae, text_encoder, tokenizer, scheduler)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    tok_dir = folder / "_tokenizer_src"
    vocab_size = write_tiny_clip_tokenizer(tok_dir)
    unet = UNet2DConditionModel(**{**TINY_UNET, **(unet_overrides or {})})
    _randomise(unet, seed)
    vae = AutoencoderKL(**TINY_VAE)
    _randomise(vae, seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**TINY_CLIP, "vocab_size": vocab_size,
                                                   "hidden_size": unet.config.cross_attention_dim}))
    _randomise(text_encoder, seed + 2)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return _save_pipeline(pipe, folder, tok_dir)


def build_tiny_controlnet(folder: str | Path, base: str | Path, *, seed: int = 10,
                          overrides: dict | None = None) -> Path:
    """A ControlNet folder made from the base's UNet (``ControlNetModel.from_unet``), or from the UNet config with
    ``overrides`` applied (to build deliberately mismatched nets)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    folder = Path(folder)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", use_safetensors=True)
    if overrides:
        cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
        cfg.update(overrides)
        unet = UNet2DConditionModel(**{k: v for k, v in cfg.items() if k in TINY_UNET or k in overrides})
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    _randomise(net, seed)
    net.save_pretrained(folder, safe_serialization=True)
    return folder


# SDXL family: two text encoders (hidden states concatenated: 32 + 32 = cross_attention_dim 64) and the "text_time"
# addition embedding (6 size/crop ids x 8 + the pooled 32-d projection of text encoder 2 = 80).
TINY_SDXL_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
    norm_num_groups=8,
)


def build_tiny_sdxl_base(folder: str | Path, *, seed: int = 20) -> Path:
    """A diffusers-format SDXL-style pipeline folder (unet, vae, text_encoder(_2), tokenizer(_2), scheduler)."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    tok_dir = folder / "_tokenizer_src"
    vocab_size = write_tiny_clip_tokenizer(tok_dir)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    _randomise(unet, seed)
    vae = AutoencoderKL(**TINY_VAE)
    _randomise(vae, seed + 1)
    cfg = CLIPTextConfig(**{**TINY_CLIP, "vocab_size": vocab_size, "projection_dim": 32})
    text_encoder, text_encoder_2 = CLIPTextModel(cfg), CLIPTextModelWithProjection(cfg)
    _randomise(text_encoder, seed + 2)
    _randomise(text_encoder_2, seed + 3)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    return _save_pipeline(pipe, folder, tok_dir)
