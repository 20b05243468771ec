"""Control images for ControlNet backends, made from a layout's label map: the fixed segmentation palette, edges
(Canny, standard line art) through controlnet-aux or OpenCV, and the documented pad that keeps labels aligned.

Everything here is a pure function of the label map (no randomness). Control images are uint8 HxWx3 RGB.

Padding: a label map of H x W is padded at the bottom and right to the next multiple of ``multiple`` (64 by
default: a multiple of the SD VAE factor 8 and of controlnet-aux's 64-pixel detector grid) by repeating the last
row/column (``numpy.pad(mode="edge")``), so padding draws no new class boundary. The generated image is cropped back
to ``[:H, :W]``; the label itself is never resized.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from schemas.classes import class_table  # noqa: F401  (re-exported for callers of the palette)

CONDITIONINGS = ("segmentation", "canny", "lineart")
ANNOTATORS = ("controlnet_aux", "opencv")
PAD_MODE = "edge"
PAD_MULTIPLE = 64
# Canny hysteresis thresholds on the (noise-free) palette image. Two palette colours differ by at least
# MIN_PALETTE_STEP grey levels in some channel; a step of d gives a 3x3 Sobel response of 4d, so with
# CANNY_HIGH < 4 * MIN_PALETTE_STEP every class boundary becomes an edge (controlnet-aux's 100/200 would miss the
# close soft-tissue colours). Tested in tests/test_controlnet_conditioning.py.
MIN_PALETTE_STEP = 10
CANNY_LOW, CANNY_HIGH = 16, 32
# LineartStandardDetector's defaults.
LINEART_SIGMA, LINEART_THRESHOLD = 6.0, 8


def palette_lut(domain: str) -> tuple[np.ndarray, np.ndarray]:
    """A 256x3 uint8 lookup table id -> RGB and a 256 bool mask of the ids that have a colour.

    Raises ValueError when the table leaves a class without a colour or gives two classes the same colour (a
    segmentation ControlNet could not tell them apart)."""
    table = class_table(domain)
    missing = sorted(set(table.names) - set(table.colors))
    if missing:
        raise ValueError(f"the {domain} class table has no palette colour for class id(s) {missing}")
    seen: dict[tuple[int, int, int], int] = {}
    for k, c in table.colors.items():
        if tuple(c) in seen:
            raise ValueError(f"the {domain} palette gives classes {seen[tuple(c)]} and {k} the same colour {c}")
        seen[tuple(c)] = k
    lut = np.zeros((256, 3), np.uint8)
    known = np.zeros(256, bool)
    for k, c in table.colors.items():
        lut[k] = c
        known[k] = True
    return lut, known


def padded_size(height: int, width: int, multiple: int = PAD_MULTIPLE) -> tuple[int, int]:
    return math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple


def pad_label(label: np.ndarray, multiple: int = PAD_MULTIPLE) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad ``label`` at the bottom/right to a multiple of ``multiple`` by edge replication; returns
    (padded label, (rows added at the bottom, columns added at the right))."""
    h, w = label.shape[:2]
    hp, wp = padded_size(h, w, multiple)
    pad = (hp - h, wp - w)
    if pad == (0, 0):
        return label, pad
    return np.pad(label, ((0, pad[0]), (0, pad[1])), mode=PAD_MODE), pad


def segmentation_image(label: np.ndarray, domain: str) -> np.ndarray:
    """The label map painted with the domain's fixed palette (HxWx3 uint8). An id without a colour is an error."""
    if label.dtype != np.uint8:
        raise ValueError(f"label maps are uint8 class ids, got {label.dtype}")
    lut, known = palette_lut(domain)
    present = np.unique(label)
    unknown = present[~known[present]]
    if unknown.size:
        raise ValueError(f"label map holds class id(s) {unknown.tolist()} that the {domain} palette does not know")
    return lut[label]


def _hwc3(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[:, :, None], 3, axis=2) if x.ndim == 2 else x


def _check_grid(img: np.ndarray) -> None:
    h, w = img.shape[:2]
    if h % 64 or w % 64:
        # controlnet-aux resizes to multiples of 64; on that grid its resize is the identity, so edges stay aligned.
        raise ValueError(f"edge maps are made on the padded 64-pixel grid; got {h}x{w} (pad with pad_label first)")


def canny_image(label: np.ndarray, domain: str, annotator: str = "controlnet_aux",
                low: int = CANNY_LOW, high: int = CANNY_HIGH) -> np.ndarray:
    """Canny edges of the palette image (white edges on black, HxWx3 uint8), at exactly the label's size."""
    seg = segmentation_image(label, domain)
    _check_grid(seg)
    if annotator == "controlnet_aux":
        from schemas.extras import import_extra

        CannyDetector = import_extra("controlnet_aux.canny", "annotator: controlnet_aux").CannyDetector

        side = min(seg.shape[:2])
        return CannyDetector()(seg, low_threshold=low, high_threshold=high, detect_resolution=side,
                               image_resolution=side, output_type="np")
    if annotator == "opencv":
        return _hwc3(cv2.Canny(seg, low, high))
    raise ValueError(f"unknown annotator {annotator!r}; accepted: {', '.join(ANNOTATORS)}")


def lineart_image(label: np.ndarray, domain: str, annotator: str = "controlnet_aux") -> np.ndarray:
    """Standard line art (LineartStandardDetector: blurred minus image, normalised) of the palette image."""
    seg = segmentation_image(label, domain)
    _check_grid(seg)
    if annotator == "controlnet_aux":
        from schemas.extras import import_extra

        LineartStandardDetector = import_extra("controlnet_aux.lineart_standard",
                                               "annotator: controlnet_aux").LineartStandardDetector

        return LineartStandardDetector()(seg, guassian_sigma=LINEART_SIGMA, intensity_threshold=LINEART_THRESHOLD,
                                         detect_resolution=min(seg.shape[:2]), output_type="np")
    if annotator == "opencv":
        # The same arithmetic as controlnet-aux's LineartStandardDetector, without importing it.
        x = seg.astype(np.float32)
        g = cv2.GaussianBlur(x, (0, 0), LINEART_SIGMA)
        intensity = np.min(g - x, axis=2).clip(0, 255)
        strong = intensity[intensity > LINEART_THRESHOLD]
        intensity /= max(16, np.median(strong)) if strong.size else 16
        intensity *= 127
        return _hwc3(intensity.clip(0, 255).astype(np.uint8))
    raise ValueError(f"unknown annotator {annotator!r}; accepted: {', '.join(ANNOTATORS)}")


def control_image(conditioning: str, label: np.ndarray, domain: str, annotator: str = "controlnet_aux") -> np.ndarray:
    """The control image of one kind for an (already padded) label map."""
    if conditioning == "segmentation":
        return segmentation_image(label, domain)
    if conditioning == "canny":
        return canny_image(label, domain, annotator)
    if conditioning == "lineart":
        return lineart_image(label, domain, annotator)
    raise ValueError(f"unknown conditioning {conditioning!r}; accepted: {', '.join(CONDITIONINGS)}")
