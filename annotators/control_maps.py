"""Control maps from images (for later diffusion rendering) via controlnet-aux.

No weights needed: ``canny`` (CannyDetector), ``lineart_standard`` (LineartStandardDetector) and ``content_shuffle``
(ContentShuffleDetector's algorithm: a random smooth flow field remaps the image). Detectors that need weights
(``hed``, ``pidi``, ``mlsd``, ``midas``, ``lineart``, ``normalbae``) run only from a local folder the user gives
(``weights_dir``); nothing is ever downloaded.

Every map is uint8 HxWx3 RGB at the input's size. controlnet-aux resizes to multiples of 64; the map is computed at
``detect_resolution`` = the image's own size rounded up to 64 and resized back to H x W (bilinear: a control map
is an image, not a label). ``content_shuffle`` draws its flow field from the caller's ``rng`` (controlnet-aux's own
class uses numpy's global random state, which pairforge never touches) and is otherwise the same computation.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from schemas.errors import SpecError

NO_WEIGHTS = ("canny", "lineart_standard", "content_shuffle")
# name -> (controlnet_aux module, class, weights file its from_pretrained expects in the folder)
WITH_WEIGHTS: dict[str, tuple[str, str, str]] = {
    "hed": ("controlnet_aux.hed", "HEDdetector", "ControlNetHED.pth"),
    "pidi": ("controlnet_aux.pidi", "PidiNetDetector", "table5_pidinet.pth"),
    "mlsd": ("controlnet_aux.mlsd", "MLSDdetector", "mlsd_large_512_fp32.pth"),
    "midas": ("controlnet_aux.midas", "MidasDetector", "dpt_hybrid-midas-501f0c75.pt"),
    "lineart": ("controlnet_aux.lineart", "LineartDetector", "sk_model.pth"),
    "normalbae": ("controlnet_aux.normalbae", "NormalBaeDetector", "scannet.pt"),
}
CANNY_LOW, CANNY_HIGH = 100, 200  # controlnet-aux defaults
_DETECTORS: dict[tuple[str, str], Any] = {}


def available_control_maps(weights_dir: str | os.PathLike | None = None) -> list[str]:
    """The maps that can run here: the weight-free ones, plus those whose weights file is in ``weights_dir``."""
    out = list(NO_WEIGHTS)
    if weights_dir is not None and Path(weights_dir).is_dir():
        out += [k for k, (_, _, f) in WITH_WEIGHTS.items() if (Path(weights_dir) / f).is_file()]
    return out


def _rgb(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise SpecError(f"control maps take 8-bit images, not {a.dtype}; convert first (CT: window to 0-255)")
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2)
    if a.ndim == 3 and a.shape[2] == 3:
        return a
    raise SpecError(f"control maps take HxW or HxWx3 images, not shape {a.shape}")


def _res(h: int, w: int) -> int:
    return int(np.ceil(max(h, w) / 64.0) * 64)


def _back(m: np.ndarray, h: int, w: int) -> np.ndarray:
    m = np.asarray(m)
    if m.ndim == 2:
        m = np.repeat(m[..., None], 3, axis=2)
    if m.shape[:2] != (h, w):
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(m.astype(np.uint8))


def _detector(name: str, weights_dir: str | None) -> Any:
    key = (name, str(weights_dir))
    if key in _DETECTORS:
        return _DETECTORS[key]
    if name == "canny":
        det = importlib.import_module("controlnet_aux.canny").CannyDetector()
    elif name == "lineart_standard":
        det = importlib.import_module("controlnet_aux.lineart_standard").LineartStandardDetector()
    else:
        mod, cls, fname = WITH_WEIGHTS[name]
        if weights_dir is None:
            raise SpecError(f"control map {name!r} needs weights; give weights_dir, a local folder holding {fname} "
                            f"(nothing is downloaded); weight-free maps: {', '.join(NO_WEIGHTS)}")
        folder = Path(weights_dir).expanduser()
        if not folder.is_dir() or not (folder / fname).is_file():
            raise SpecError(f"control map {name!r}: {fname} is not in {str(folder)!r}; put the file there or use a "
                            f"weight-free map ({', '.join(NO_WEIGHTS)})")
        det = getattr(importlib.import_module(mod), cls).from_pretrained(str(folder))
    _DETECTORS[key] = det
    return det


def content_shuffle(image: np.ndarray, rng: np.random.Generator, f: int = 256) -> np.ndarray:
    """ContentShuffleDetector's computation with the flow field drawn from ``rng``."""
    img = _rgb(image)
    h, w = img.shape[:2]

    def noise_disk() -> np.ndarray:
        n = rng.uniform(0, 1, size=((h // f) + 2, (w // f) + 2)).astype(np.float32)
        n = cv2.resize(n, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)[f:f + h, f:f + w]
        n -= n.min()
        n /= max(float(n.max()), 1e-12)
        return n

    x = noise_disk() * float(w - 1)
    y = noise_disk() * float(h - 1)
    return cv2.remap(img, x, y, cv2.INTER_LINEAR)


def control_map(image: np.ndarray, kind: str, *, weights_dir: str | os.PathLike | None = None,
                rng: np.random.Generator | None = None, **options: Any) -> np.ndarray:
    """One control map of ``kind`` for an 8-bit image -> uint8 HxWx3 at the image's size.

    Options: canny ``low_threshold``/``high_threshold`` (100/200); lineart_standard ``guassian_sigma`` (6.0,
    controlnet-aux's spelling) and ``intensity_threshold`` (8); content_shuffle ``f`` (256) and a required ``rng``."""
    img = _rgb(image)
    h, w = img.shape[:2]
    if kind not in NO_WEIGHTS and kind not in WITH_WEIGHTS:
        raise SpecError(f"unknown control map {kind!r}; accepted: {', '.join(NO_WEIGHTS + tuple(WITH_WEIGHTS))}")
    if kind == "content_shuffle":
        if rng is None:
            raise SpecError("content_shuffle is random: pass rng= (the sample's numpy Generator)")
        unknown = set(options) - {"f"}
        if unknown:
            raise SpecError(f"unknown option(s) {', '.join(sorted(unknown))} for content_shuffle; accepted: f")
        return content_shuffle(img, rng, int(options.get("f", 256)))
    det = _detector(kind, None if weights_dir is None else str(weights_dir))
    res = _res(h, w)
    if kind == "canny":
        unknown = set(options) - {"low_threshold", "high_threshold"}
        if unknown:
            raise SpecError(f"unknown option(s) {', '.join(sorted(unknown))} for canny; accepted: low_threshold, "
                            "high_threshold")
        m = det(img, low_threshold=int(options.get("low_threshold", CANNY_LOW)),
                high_threshold=int(options.get("high_threshold", CANNY_HIGH)), detect_resolution=res,
                image_resolution=res, output_type="np")
    elif kind == "lineart_standard":
        unknown = set(options) - {"guassian_sigma", "intensity_threshold"}
        if unknown:
            raise SpecError(f"unknown option(s) {', '.join(sorted(unknown))} for lineart_standard; accepted: "
                            "guassian_sigma, intensity_threshold")
        m = det(img, guassian_sigma=float(options.get("guassian_sigma", 6.0)),
                intensity_threshold=int(options.get("intensity_threshold", 8)), detect_resolution=res,
                output_type="np")
    else:
        m = det(img, detect_resolution=res, image_resolution=res, output_type="np", **options)
    return _back(m, h, w)


def control_maps(image: np.ndarray, kinds: tuple[str, ...] | list[str] = NO_WEIGHTS, *,
                 weights_dir: str | os.PathLike | None = None, rng: np.random.Generator | None = None
                 ) -> dict[str, np.ndarray]:
    """Several maps of one image: {kind: uint8 HxWx3}."""
    return {k: control_map(image, k, weights_dir=weights_dir, rng=rng) for k in kinds}
