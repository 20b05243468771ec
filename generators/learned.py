"""The ``learned`` render backend and the networks ``pairforge train`` fits: a label map -> image diffusion model
trained on the user's own pairs, read from a model folder (config.json + model.safetensors + provenance.json).

Owns, top to bottom: the model-folder format and every refusal made on reading it (pickles, another domain, another
class table, a config this code cannot build), the from-scratch networks (MONAI generative ``SPADEDiffusionModelUNet``,
or ``DiffusionModelUNet`` + ``ControlNet`` trained together; both read the one-hot label map in pixel space), the
image <-> network intensity mapping (CT: HU window; uint8: 0..255), the deterministic samplers (rectified-flow Euler,
v-prediction DDIM), and rendering in batches with one CPU ``torch.Generator`` per sample. Route-2 models (a
fine-tuned diffusers ControlNet) are rendered through ``generators.controlnet``. torch and MONAI load only when this
backend is asked for.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from generators.base import Renderer, register_renderer
from generators.conditioning import pad_label
from schemas.classes import class_table
from schemas.errors import GenerationError, SpecError
from schemas.sample import Layout
from schemas.seeding import torch_seed

FORMAT = "pairforge.learned/1"
CONFIG, WEIGHTS, PROVENANCE = "config.json", "model.safetensors", "provenance.json"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
# Network intensity window per image kind: x = 2 * (v - low) / (high - low) - 1. CT keeps air (-1024) to dense bone;
# the store's range (-1024..3071 HU) is wider, but nothing the phantoms or real chest CT hold above 1500 HU matters.
INTENSITY = {"hu": {"low": -1024.0, "high": 1500.0}, "uint8": {"low": 0.0, "high": 255.0}}


# ------------------------------------------------------------------------------------------------ intensities
def to_network(image: np.ndarray, kind: str) -> np.ndarray:
    """Image (HU float or uint8, HxW or HxWxC) -> float32 CxHxW in [-1, 1] (HU outside the window is clipped)."""
    w = INTENSITY[kind]
    x = np.asarray(image, np.float32)
    x = x[None] if x.ndim == 2 else np.moveaxis(x, -1, 0)
    return np.clip(2.0 * (x - w["low"]) / (w["high"] - w["low"]) - 1.0, -1.0, 1.0)


def from_network(x: np.ndarray, kind: str) -> np.ndarray:
    """float CxHxW in [-1, 1] -> the domain's image: float32 HU (HxW) or uint8 (HxW or HxWx3)."""
    w = INTENSITY[kind]
    v = (np.clip(x, -1.0, 1.0) + 1.0) * 0.5 * (w["high"] - w["low"]) + w["low"]
    v = v[0] if v.shape[0] == 1 else np.moveaxis(v, 0, -1)
    return v.astype(np.float32) if kind == "hu" else np.round(v).astype(np.uint8)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """uint8/long BxHxW class ids -> float Bx K xHxW."""
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()


# ------------------------------------------------------------------------------------------------ networks
class LabelDiffusionNet(torch.nn.Module):
    """eps/velocity network ``f(x_t, t, onehot)``; ``t`` in [0, 1] (fed to MONAI's sinusoidal embedding x 1000)."""

    def __init__(self, net: dict[str, Any], image_channels: int, num_classes: int):
        super().__init__()
        from monai.networks.nets import ControlNet, DiffusionModelUNet, SPADEDiffusionModelUNet

        self.architecture = net["architecture"]
        common = dict(spatial_dims=2, in_channels=image_channels, num_res_blocks=net["num_res_blocks"],
                      channels=tuple(net["channels"]), attention_levels=tuple(net["attention_levels"]),
                      norm_num_groups=net["norm_num_groups"], num_head_channels=net["num_head_channels"],
                      use_flash_attention=net["flash_attention"])
        if self.architecture == "spade":
            self.unet = SPADEDiffusionModelUNet(out_channels=image_channels, label_nc=num_classes,
                                                spade_intermediate_channels=net["spade_hidden"], **common)
            self.control = None
        elif self.architecture == "controlnet":
            self.unet = DiffusionModelUNet(out_channels=image_channels, **common)
            # One embedding level: the control path stays at pixel resolution (no latent-space downsampling).
            self.control = ControlNet(conditioning_embedding_in_channels=num_classes,
                                      conditioning_embedding_num_channels=(net["channels"][0],), **common)
        else:
            raise SpecError(f"model architecture {self.architecture!r} is not known; accepted: spade, controlnet")

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        ts = t * 1000.0
        if self.control is None:
            return self.unet(x, ts, seg=cond)
        down, mid = self.control(x, ts, controlnet_cond=cond)
        return self.unet(x, ts, down_block_additional_residuals=down, mid_block_additional_residual=mid)


def build_network(config: dict[str, Any]) -> LabelDiffusionNet:
    return LabelDiffusionNet(config["network"], config["image"]["channels"], config["num_classes"])


# ------------------------------------------------------------------------------------------------ objectives
def _vp(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)


def training_target(objective: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) for one training step. rectified_flow: x_t = (1-t) x0 + t eps, target eps - x0.
    v_prediction (cosine VP): x_t = a x0 + s eps, target a eps - s x0."""
    tb = t.view(-1, 1, 1, 1)
    if objective == "rectified_flow":
        return (1.0 - tb) * x0 + tb * noise, noise - x0
    a, s = _vp(tb)
    return a * x0 + s * noise, a * noise - s * x0


def sample_timesteps(objective: str, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Training times: logit-normal for rectified flow (as SD3/MAISI-v2 do), uniform for v-prediction."""
    if objective == "rectified_flow":
        return torch.sigmoid(torch.randn(n, generator=generator, device=device))
    return torch.rand(n, generator=generator, device=device).clamp(1e-4, 1 - 1e-4)


@torch.no_grad()
def sample(net: torch.nn.Module, cond: torch.Tensor, noise: torch.Tensor, objective: str, steps: int,
           autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Deterministic sampler from ``noise`` (the t=1 state): Euler on the rectified flow, or DDIM on the cosine
    VP schedule for v-prediction. Returns x0 in network units (float32)."""
    x = noise.float()
    ts = torch.linspace(1.0, 0.0, steps + 1, device=x.device)
    dev_type = x.device.type
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        tt = t.expand(x.shape[0])
        with torch.autocast(dev_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = net(x, tt, cond).float()
        if objective == "rectified_flow":
            x = x + (t_next - t) * out
        else:
            a, s = _vp(t)
            x0 = a * x - s * out
            eps = s * x + a * out
            a2, s2 = _vp(t_next)
            x = a2 * x0 + s2 * eps
    return x


# ------------------------------------------------------------------------------------------------ model folders
def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{what}: {str(path)!r} is missing") from None
    except (OSError, ValueError) as e:
        raise SpecError(f"{what}: {str(path)!r} is not readable JSON ({type(e).__name__})") from None


def read_model_config(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The model folder and its config; pickles, single files and foreign folders are refused (one line)."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise SpecError(f"model {str(p)!r} is a pickle checkpoint; pairforge loads safetensors only (unpickling "
                            "can execute arbitrary code); give a model folder written by pairforge train")
        raise SpecError(f"model {str(p)!r} is a file; give the model folder written by pairforge train "
                        f"({CONFIG} + {WEIGHTS})")
    if not p.is_dir():
        raise SpecError(f"model folder {str(p)!r} does not exist")
    if not (p / WEIGHTS).is_file() and not (p / "controlnet" / "diffusion_pytorch_model.safetensors").is_file():
        pickles = sorted(f.name for f in p.rglob("*") if f.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise SpecError(f"model folder {str(p)!r} holds only pickle weights ({', '.join(pickles)}); pairforge "
                            "loads safetensors only (unpickling can execute arbitrary code)")
        raise SpecError(f"model folder {str(p)!r} has no {WEIGHTS}")
    cfg = _read_json(p / CONFIG, "model config")
    if cfg.get("format") != FORMAT:
        raise SpecError(f"model folder {str(p)!r} is not a pairforge learned model (format {cfg.get('format')!r}; "
                        f"accepted: {FORMAT})")
    return p.resolve(), cfg


def check_model_for(cfg: dict[str, Any], domain: str, where: str) -> None:
    """Refuse a model trained for another domain or on another class table than ``domain``'s published one."""
    if cfg.get("domain") != domain:
        raise SpecError(f"model {where} was trained for domain {cfg.get('domain')!r}; it cannot render {domain!r} "
                        "specs (train one on that domain's pairs)")
    try:
        table = class_table(domain).as_dict()
    except KeyError as e:
        raise SpecError(str(e).strip("'\"")) from None
    if cfg.get("classes") != table:
        theirs, ours = cfg.get("classes") or {}, table
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        k = diff[0] if diff else "?"
        raise SpecError(f"model {where} was trained on a different {domain} class table (id {k}: "
                        f"{theirs.get(k)!r} in the model, {ours.get(k)!r} here); retrain it on this table")


def load_state(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))


# ------------------------------------------------------------------------------------------------ renderer
def _device(v: Any) -> torch.device:
    if v == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if v == "cpu":
        return torch.device("cpu")
    if isinstance(v, str) and v.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SpecError(f"option device: {v!r} asks for a CUDA GPU that this machine does not have; accepted: "
                            "auto, cpu, cuda, cuda:N")
        return torch.device(v)
    raise SpecError(f"option device: {v!r} is not accepted; accepted: auto, cpu, cuda, cuda:N")


@register_renderer
class LearnedRenderer(Renderer):
    """Label map -> one-hot -> trained diffusion model -> image in the domain's units (CT: HU)."""

    name = "learned"
    version = "1"
    domains = ("*",)  # any domain whose description lists "learned"; the model folder says which one it draws
    options_accepted = ("model", "steps", "device", "precision", "batch_size")

    def __init__(self, domain: str, options: dict[str, Any] | None = None):
        super().__init__(domain, options)
        o = self.options
        if not isinstance(o.get("model"), str) or not o["model"]:
            raise SpecError("option model is required: the folder written by pairforge train")
        self.folder, self.config = read_model_config(o["model"])
        check_model_for(self.config, domain, repr(str(self.folder)))
        steps = o.get("steps", self.config.get("sample_steps", 30))
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
            raise SpecError(f"option steps: {steps!r} is not accepted; accepted: an integer from 1 to 1000")
        self.steps = steps
        self.device = _device(o.get("device", "auto"))
        precision = o.get("precision", "auto")
        if precision not in ("auto", "fp32", "bf16"):
            raise SpecError(f"option precision: {precision!r} is not accepted; accepted: auto, fp32, bf16")
        self.precision = ("bf16" if self.device.type == "cuda" else "fp32") if precision == "auto" else precision
        bs = o.get("batch_size", 16)
        if isinstance(bs, bool) or not isinstance(bs, int) or not 1 <= bs <= 4096:
            raise SpecError(f"option batch_size: {bs!r} is not accepted; accepted: an integer from 1 to 4096")
        self.batch_size = bs
        self.route = self.config.get("route", "scratch")
        self._net = None
        self._delegate = None
        if self.route == "controlnet":
            from generators.controlnet import ControlNetRenderer

            ft = self.config["finetune"]
            window = {"hu_window": ft["hu_window"]} if self.config["image"]["kind"] == "hu" else {}
            self._delegate = ControlNetRenderer(domain, {
                **window, "base_model": ft["base_model"], "prompt": ft.get("prompt") or "",
                "negative_prompt": "", "guidance_scale": 1.0, "steps": self.steps, "scheduler": "ddim",
                "device": str(self.device), "batch_size": self.batch_size,
                "controlnets": [{"path": str(self.folder / "controlnet"), "conditioning": "segmentation",
                                 "annotator": "opencv"}]})

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.config["network"]["channels"]) - 1) if self.route == "scratch" else 64

    def check_spec(self, spec: Any) -> None:
        if self._delegate is not None:
            return self._delegate.check_spec(spec)
        sp = getattr(getattr(spec, "image", None), "spacing_mm", None)
        trained = self.config.get("spacing_mm")
        if sp is not None and trained:
            lo, hi = trained[0] / 1.5, trained[1] * 1.5
            if sp[0] > hi or sp[1] < lo:
                raise SpecError(f"image.spacing_mm {sp[0]:g}-{sp[1]:g} is far from the {trained[0]:g}-{trained[1]:g} "
                                f"mm the model was trained at; accepted: spacings within {lo:.2f}-{hi:.2f} mm")

    def network(self) -> torch.nn.Module:
        if self._net is None:
            net = build_network(self.config)
            state = load_state(self.folder / WEIGHTS)
            missing, unexpected = net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise SpecError(f"model {str(self.folder)!r}: weights do not match its config ({len(missing)} missing,"
                                f" {len(unexpected)} unexpected tensors, e.g. {(missing or unexpected)[0]})")
            self._net = net.to(self.device).eval()
        return self._net

    def render(self, layout: Layout, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        return self.render_batch([layout], [rng])[0]

    def render_batch(self, layouts: list[Layout], rngs: list[np.random.Generator]) -> list[tuple[np.ndarray, dict]]:
        if self._delegate is not None:
            out = self._delegate.render_batch(layouts, rngs)
            return [(img, {**p, "backend": self.name, "model": self.model_record()}) for img, p in out]
        if len(layouts) != len(rngs):
            raise ValueError(f"{len(layouts)} layouts but {len(rngs)} rngs")
        seeds = [torch_seed(rng) for rng in rngs]  # each sample's seed from its own rng, as if rendered alone
        out: list[Any] = [None] * len(layouts)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, lay in enumerate(layouts):
            groups.setdefault(lay.label.shape[:2], []).append(i)
        for shape, idx in groups.items():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                images = self.generate([layouts[i].label for i in chunk], [seeds[i] for i in chunk])
                for i, img in zip(chunk, images):
                    out[i] = (img, self._params(seeds[i], len(chunk)))
        return out

    def generate(self, labels: list[np.ndarray], seeds: list[int]) -> list[np.ndarray]:
        """Images for same-shape label maps, one seed each (noise drawn on the CPU: the same on any device)."""
        h, w = labels[0].shape[:2]
        k = self.config["num_classes"]
        padded = []
        for lab in labels:
            if lab.dtype != np.uint8:
                raise ValueError(f"label maps are uint8 class ids, got {lab.dtype}")
            if int(lab.max()) >= k:
                raise SpecError(f"label map holds class id {int(lab.max())} but the model knows ids 0..{k - 1}")
            padded.append(pad_label(lab, self.multiple)[0])
        hp, wp = padded[0].shape
        c = self.config["image"]["channels"]
        noise = torch.stack([torch.randn((c, hp, wp), generator=torch.Generator("cpu").manual_seed(s))
                             for s in seeds]).to(self.device)
        lab_t = torch.from_numpy(np.stack(padded)).to(self.device)
        cond = one_hot(lab_t, k)
        dtype = torch.bfloat16 if self.precision == "bf16" else None
        x = sample(self.network(), cond, noise, self.config["objective"], self.steps, dtype).cpu().numpy()
        if not np.isfinite(x).all():
            raise GenerationError("the learned model produced NaN/inf pixels; try precision fp32")
        kind = self.config["image"]["kind"]
        return [from_network(xi[:, :h, :w], kind) for xi in x]

    def model_record(self) -> dict[str, Any]:
        """What a rendered sample records about the model (read once)."""
        if not hasattr(self, "_record"):
            prov = self.folder / PROVENANCE
            data = _read_json(prov, "model provenance").get("data", {}) if prov.is_file() else {}
            self._record = {"name": self.config.get("name"), "route": self.route,
                            "weights_sha256": self.config.get("weights_sha256"),
                            "steps_trained": self.config.get("steps_trained"),
                            "training_data_sha256": data.get("sha256")}
        return self._record

    def _params(self, seed: int, batch: int) -> dict[str, Any]:
        return {"backend": self.name, "seed": seed, "steps": self.steps, "objective": self.config["objective"],
                "precision": self.precision, "device": self.device.type, "batch_size": batch,
                "model": self.model_record(), "output": self.config["image"],
                "versions": {"torch": torch.__version__}}
