"""A small 2D MONAI U-Net (DynUNet) segmenter for evaluations: trained on labelled images (real, stand-in or synthetic),
it segments other images (label fidelity, TSTR, augmentation studies) and gives encoder features (a
feature-space distance when no extractor is given on disk).

Images are resampled to one working pixel spacing (linear; labels nearest), windowed into channels and given two
coordinate channels in millimetres (so a patch knows where it sits: left or right lung, front or back). Training
draws patches, half of them centred on a finding; inference runs on whole images and maps the prediction back to
each image's own grid (nearest). All randomness comes from the seed given.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import cv2
import numpy as np

COORD_SCALE_MM = 200.0


@dataclass
class SegmenterConfig:
    patch: int = 96
    steps: int = 300
    batch: int = 8
    lr: float = 1e-2
    channels: tuple[int, ...] = (8, 16, 32, 64)
    num_res_units: int = 0
    norm: str = "instance"
    finding_fraction: float = 0.67     # share of patches centred on a finding pixel
    dice_over_batch: bool = True       # Dice summed over the batch: steadier for small, rare findings
    spacing_mm: float | None = None    # working spacing; None: the median of the training images
    augment: bool = True               # intensity shift/scale and added noise (a competent default)
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None


def resample(a: np.ndarray, sp: float, target: float, nearest: bool) -> np.ndarray:
    if abs(sp - target) < 1e-6:
        return a
    h, w = a.shape
    nh, nw = max(8, int(round(h * sp / target))), max(8, int(round(w * sp / target)))
    return cv2.resize(a, (nw, nh), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)


def input_channels(image: np.ndarray, sp: float, windows: Sequence[tuple[float, float]]) -> np.ndarray:
    """(len(windows) + 2, H, W) float32: each window scaled to [0, 1], then x and y in mm / 200 from the centre."""
    h, w = image.shape
    chans = [np.clip((image - (c - wd / 2)) / wd, 0, 1).astype(np.float32) for c, wd in windows]
    xs = ((np.arange(w, dtype=np.float32) + 0.5 - w / 2) * sp / COORD_SCALE_MM)[None, :].repeat(h, 0)
    ys = ((np.arange(h, dtype=np.float32) + 0.5 - h / 2) * sp / COORD_SCALE_MM)[:, None].repeat(w, 1)
    return np.stack(chans + [xs, ys]).astype(np.float32)


def _pad_to(x: np.ndarray, size: int, value: float = 0.0) -> np.ndarray:
    h, w = x.shape[-2:]
    ph, pw = max(0, size - h), max(0, size - w)
    if ph == 0 and pw == 0:
        return x
    pad = [(0, 0)] * (x.ndim - 2) + [(ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)]
    return np.pad(x, pad, constant_values=value)


class Segmenter:
    """A trained (or loaded) UNet with its configuration, windows, class names and working spacing."""

    def __init__(self, model, cfg: SegmenterConfig, windows, class_names: list[str], spacing_mm: float,
                 history: list[float] | None = None):
        self.model, self.cfg, self.windows = model, cfg, tuple(tuple(w) for w in windows)
        self.class_names, self.spacing_mm = list(class_names), float(spacing_mm)
        self.history = history or []

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def _forward_full(self, image: np.ndarray, sp: float, want_features: bool = False):
        import torch
        from monai.inferers import sliding_window_inference

        x = input_channels(resample(image.astype(np.float32), sp, self.spacing_mm, False), self.spacing_mm,
                           self.windows)
        P = self.cfg.patch
        h, w = x.shape[1:]
        xp = _pad_to(x, P)
        feats: list = []
        hook = None
        if want_features:
            hook = self._bottleneck().register_forward_hook(lambda mod, i, o: feats.append(o))
        # Windows of the training patch size: what the network saw in training (instance norm statistics).
        with torch.no_grad():
            logits = sliding_window_inference(torch.from_numpy(xp)[None].to(self.cfg.device), (P, P), 16,
                                              self.model, overlap=0.25, mode="gaussian")[0]
        ph, pw = (xp.shape[1] - h) // 2, (xp.shape[2] - w) // 2
        logits = logits[:, ph:ph + h, pw:pw + w]
        if hook is not None:
            hook.remove()
        return logits, feats

    def _bottleneck(self):
        """The network's deepest block (coarsest resolution, most channels)."""
        return self.model.bottleneck

    def predict(self, image: np.ndarray, sp: float) -> np.ndarray:
        """Class-index map on the image's own grid."""
        import torch

        self.model.eval()
        logits, _ = self._forward_full(image, sp)
        if tuple(logits.shape[1:]) != image.shape:
            logits = torch.nn.functional.interpolate(logits[None], size=image.shape, mode="bilinear",
                                                     align_corners=False)[0]
        return logits.argmax(0).cpu().numpy().astype(np.uint8)

    def features(self, image: np.ndarray, sp: float) -> np.ndarray:
        """Encoder features of one image: mean and std of the bottleneck activations over space."""
        import torch

        self.model.eval()
        _, feats = self._forward_full(image, sp, want_features=True)
        f = torch.cat([o.flatten(2) for o in feats], 0).transpose(0, 1).flatten(1)  # (C, windows x positions)
        return np.concatenate([f.mean(1).cpu().numpy(), f.std(1).cpu().numpy()]).astype(np.float64)

    def state(self) -> dict[str, Any]:
        return {"config": asdict(self.cfg), "windows": self.windows, "class_names": self.class_names,
                "spacing_mm": self.spacing_mm}

    def save(self, path: str) -> None:
        """Weights as safetensors and the configuration beside them (``path`` + ``.json``)."""
        import json

        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in self.model.state_dict().items()}, path)
        with open(path + ".json", "w") as f:
            json.dump(self.state(), f, indent=1)


def build_unet(n_in: int, n_classes: int, cfg: SegmenterConfig):
    """MONAI DynUNet: a full-resolution first level (small findings need it), then stride-2 levels."""
    from monai.networks.nets import DynUNet

    n = len(cfg.channels)
    return DynUNet(spatial_dims=2, in_channels=n_in, out_channels=n_classes, kernel_size=[3] * n,
                   strides=[1] + [2] * (n - 1), upsample_kernel_size=[2] * (n - 1), filters=list(cfg.channels),
                   norm_name=cfg.norm, res_block=bool(cfg.num_res_units))


def train_segmenter(images: Sequence[np.ndarray], targets: Sequence[np.ndarray], spacings: Sequence[float],
                    class_names: list[str], windows: Sequence[tuple[float, float]], cfg: SegmenterConfig,
                    finding_class: int | None = None) -> Segmenter:
    """Train a UNet on (image, class-index map) pairs. ``class_names[0]`` is the background; ``finding_class``
    (an index) is the class patches are centred on for ``cfg.finding_fraction`` of the draws."""
    import torch
    from monai.losses import DiceCELoss

    if len(images) == 0:
        raise ValueError("no training images")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed))
    torch.manual_seed(int(rng.integers(0, 2**31 - 1)))  # weight initialisation, from the run's own seed
    target_sp = float(cfg.spacing_mm or np.median(spacings))
    xs, ys, fg = [], [], []
    for img, t, sp in zip(images, targets, spacings):
        x = input_channels(resample(img.astype(np.float32), sp, target_sp, False), target_sp, windows)
        y = resample(t.astype(np.uint8), sp, target_sp, True)
        x, y = _pad_to(x, cfg.patch), _pad_to(y, cfg.patch)
        xs.append(x)
        ys.append(y)
        fg.append(np.argwhere(y == finding_class) if finding_class is not None else np.zeros((0, 2), int))
    n_in, n_cls = xs[0].shape[0], len(class_names)
    model = build_unet(n_in, n_cls, cfg).to(cfg.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.15)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, squared_pred=False,
                         smooth_nr=1e-3, smooth_dr=1e-3, batch=cfg.dice_over_batch)
    with_fg = [i for i, f in enumerate(fg) if len(f)]
    P = cfg.patch
    nw = len(windows)
    history = []
    model.train()
    for step in range(cfg.steps):
        bx = np.empty((cfg.batch, n_in, P, P), np.float32)
        by = np.empty((cfg.batch, 1, P, P), np.int64)
        for b in range(cfg.batch):
            if with_fg and rng.random() < cfg.finding_fraction:
                i = int(with_fg[rng.integers(len(with_fg))])
                cy, cx = fg[i][rng.integers(len(fg[i]))]
                cy += int(rng.integers(-P // 4, P // 4 + 1))
                cx += int(rng.integers(-P // 4, P // 4 + 1))
            else:
                i = int(rng.integers(len(xs)))
                cy = int(rng.integers(0, ys[i].shape[0]))
                cx = int(rng.integers(0, ys[i].shape[1]))
            H, W = ys[i].shape
            y0 = int(np.clip(cy - P // 2, 0, H - P))
            x0 = int(np.clip(cx - P // 2, 0, W - P))
            bx[b] = xs[i][:, y0:y0 + P, x0:x0 + P]
            by[b, 0] = ys[i][y0:y0 + P, x0:x0 + P]
        if cfg.augment:
            # Calibration and noise differ between scanners: shift/scale the windowed channels, add noise.
            g = rng.uniform(0.92, 1.08, size=(cfg.batch, 1, 1, 1)).astype(np.float32)
            o = rng.uniform(-0.03, 0.03, size=(cfg.batch, 1, 1, 1)).astype(np.float32)
            s = rng.uniform(0, 0.03, size=(cfg.batch, 1, 1, 1)).astype(np.float32)
            bx[:, :nw] = np.clip(bx[:, :nw] * g + o + s * rng.standard_normal(bx[:, :nw].shape, dtype=np.float32),
                                 0, 1)
        xb = torch.from_numpy(bx).to(cfg.device)
        yb = torch.from_numpy(by).to(cfg.device)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        sched.step()
        history.append(float(loss.detach()))
    model.eval()
    return Segmenter(model, cfg, windows, class_names, target_sp, history)


def load_segmenter(path: str, device: str = "cpu") -> Segmenter:
    import json

    from safetensors.torch import load_file

    with open(path + ".json") as f:
        st = json.load(f)
    cfg = SegmenterConfig(**{**st["config"], "channels": tuple(st["config"]["channels"]), "device": device})
    model = build_unet(len(st["windows"]) + 2, len(st["class_names"]), cfg)
    model.load_state_dict(load_file(path))
    model.eval()
    return Segmenter(model.to(device), cfg, st["windows"], st["class_names"], st["spacing_mm"])


__all__ = ["SegmenterConfig", "Segmenter", "train_segmenter", "load_segmenter", "input_channels", "resample"]
