"""Training specs for ``pairforge train``: where the pairs come from, how labels map to the domain's classes, which
route (a small label-conditioned diffusion model from scratch, or a fine-tuned diffusers ControlNet) and how long.

``load_train_spec`` turns every validation failure into one SpecError line, like dataset specs.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.errors import SpecError
from schemas.spec import NAME_RE, format_validation_error

ROUTES = ("scratch", "controlnet")
ARCHITECTURES = ("spade", "controlnet")
OBJECTIVES = ("rectified_flow", "v_prediction")


class TrainData(BaseModel):
    """One source of pairs: a published pairforge version (``NAME@vN``, read through the verified reader) or a
    folder of image/label pairs."""

    model_config = ConfigDict(extra="forbid")
    version: str | None = Field(None, description="a published pairforge version NAME@vN (read with sha256 checks)")
    root: str | None = Field(None, description="dataset root of that version (default $PAIRFORGE_ROOT or ./datasets)")
    splits: list[str] = Field(default_factory=lambda: ["train", "val"],
                              description="splits of the version to train on (its test split stays untouched)")
    folder: str | None = Field(None, description="a folder with images/ and labels/ (PNG, or NIfTI with nibabel), "
                                                 "paired by file stem")
    classes: dict[int, str] | None = Field(
        None, description="folder data: label value -> class name of the domain's table (default: the values are "
                          "the domain's own class ids)")
    image_kind: Literal["hu", "uint8"] | None = Field(
        None, description="folder data: 'hu' (16-bit PNG of HU + 1024, or NIfTI in HU) or 'uint8' (8-bit grey/RGB)")
    spacing_mm: float | None = Field(None, gt=0, le=5, description="folder data: pixel spacing in mm, if known")
    held_out: float = Field(0.1, ge=0, lt=1, description="share of pairs held out from training (recorded by id)")

    @model_validator(mode="after")
    def _one_source(self) -> "TrainData":
        if (self.version is None) == (self.folder is None):
            raise ValueError("give exactly one of data.version (NAME@vN) or data.folder")
        if self.version is not None:
            if "@v" not in self.version:
                raise ValueError(f"data.version {self.version!r} must name a version, like chest-ct@v3")
            for k in ("classes", "image_kind", "spacing_mm"):
                if getattr(self, k) is not None:
                    raise ValueError(f"data.{k} applies to folder data only; a version carries its own")
        if self.folder is not None and self.image_kind is None:
            raise ValueError("data.image_kind is required for folder data; accepted: hu, uint8")
        return self


class ScratchModel(BaseModel):
    """The from-scratch network (MONAI generative): SPADE-normalised diffusion UNet, or a diffusion UNet with a
    ControlNet trained jointly; both read the one-hot label map."""

    model_config = ConfigDict(extra="forbid")
    architecture: Literal["spade", "controlnet"] = "spade"
    channels: list[int] = Field(default_factory=lambda: [64, 128, 256])
    attention_levels: list[bool] = Field(default_factory=lambda: [False, False, True])
    num_res_blocks: int = Field(2, ge=1, le=4)
    num_head_channels: int = Field(32, ge=4)
    norm_num_groups: int = Field(32, ge=1)
    spade_hidden: int = Field(32, ge=4, description="SPADE's intermediate channels")
    flash_attention: bool = Field(True, description="memory-efficient attention (scaled_dot_product_attention)")

    @model_validator(mode="after")
    def _shape(self) -> "ScratchModel":
        if len(self.channels) != len(self.attention_levels):
            raise ValueError(f"model.channels has {len(self.channels)} levels but model.attention_levels has "
                             f"{len(self.attention_levels)}; give one flag per level")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"model.channels {self.channels} must all be multiples of model.norm_num_groups "
                             f"({self.norm_num_groups})")
        if any(c % self.num_head_channels for c, a in zip(self.channels, self.attention_levels) if a):
            raise ValueError(f"model.num_head_channels {self.num_head_channels} must divide the channels of every "
                             "attention level")
        return self


class FinetuneModel(BaseModel):
    """Route 2: a diffusers ControlNet trained on the user's SD-1.5 base (folder on disk), base UNet frozen."""

    model_config = ConfigDict(extra="forbid")
    base_model: str = Field(description="diffusers-format SD-1.5 family folder (safetensors)")
    controlnet: str | None = Field(None, description="a ControlNet folder to start from (default: from the base UNet)")
    prompt: str = Field("", description="the training and rendering prompt")
    lora_rank: int = Field(0, ge=0, le=256, description="LoRA rank on the base UNet's attention (0: off; needs peft)")


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(2000, ge=1, le=10_000_000, description="optimizer steps (or the wall-time budget ends it)")
    max_seconds: float | None = Field(None, gt=0, description="stop after this much training wall time")
    batch_size: int = Field(16, ge=1, le=4096)
    lr: float = Field(2e-4, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    objective: Literal["rectified_flow", "v_prediction"] = "rectified_flow"
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints (each with a validation grid)")
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = Field(0, ge=0)
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    compile: bool = Field(False, description="torch.compile the network (pays on long GPU runs)")
    sample_steps: int = Field(30, ge=1, le=1000, description="sampler steps used for validation and by default when "
                                                             "rendering")
    workers: int = Field(0, ge=0, le=64, description="data preparation processes (0: in this process)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        import re

        if v in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", v):
            return v
        raise ValueError(f"train.device {v!r} is not accepted; accepted: auto, cpu, cuda, cuda:N")


class TrainSpec(BaseModel):
    """What ``pairforge train`` reads."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="model name: lowercase letters, digits, '.', '_' or '-'")
    domain: str = Field(description="the domain the model renders (its class table and image codec)")
    description: str = ""
    data: TrainData
    route: Literal["scratch", "controlnet"] = "scratch"
    size: int = Field(128, ge=16, le=1024, description="training image side in pixels (random crops of larger "
                                                       "images, smaller ones refused)")
    model: ScratchModel = Field(default_factory=ScratchModel)
    finetune: FinetuneModel | None = None
    train: TrainSettings = Field(default_factory=TrainSettings)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"model name {v!r} is not allowed; use 1-64 lowercase letters, digits, '.', '_' or '-'")
        return v

    @model_validator(mode="after")
    def _route(self) -> "TrainSpec":
        if self.route == "controlnet" and self.finetune is None:
            raise ValueError("route controlnet needs finetune.base_model (a diffusers SD-1.5 folder on disk)")
        if self.route == "scratch" and self.finetune is not None:
            raise ValueError("finetune applies to route controlnet only; drop it or set route: controlnet")
        if self.route == "scratch":
            mult = 2 ** (len(self.model.channels) - 1)
            if self.size % mult:
                raise ValueError(f"size {self.size} is not a multiple of {mult} (2 ** (levels - 1) for "
                                 f"{len(self.model.channels)} levels)")
        elif self.size % 64:
            raise ValueError(f"size {self.size} must be a multiple of 64 for route controlnet")
        return self


def validate_train_spec(data: Any, source: str = "<train spec>") -> TrainSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a training spec must be a mapping of fields, not {type(data).__name__}")
    try:
        return TrainSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"{source}: invalid training spec: {format_validation_error(e)}") from None


def load_train_spec(path: str | Path) -> tuple[TrainSpec, str]:
    """A validated training spec and its text from a YAML/JSON file; SpecError (one line) otherwise."""
    from schemas.spec import _parse_yaml  # the dataset specs' hardened reader: size, depth, aliases, NUL, digits

    p = Path(path)
    try:
        if not p.is_file():
            raise SpecError(f"training spec {str(p)!r} does not exist or is not a file")
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"training spec {str(p)[:200]!r} cannot be read as UTF-8 text: "
                        f"{' '.join(str(getattr(e, 'strerror', None) or e).split())}") from None
    return validate_train_spec(_parse_yaml(text, str(p)), str(p)), text


def train_spec_hash(spec: TrainSpec) -> str:
    d = spec.model_dump(mode="json")
    d.pop("description", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
