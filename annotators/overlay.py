"""Views for people: intensity windows and label outlines drawn over images (8-bit RGB)."""
from __future__ import annotations

import cv2
import numpy as np

from schemas.classes import ClassTable

WINDOWS = {"lung": (-600.0, 1500.0), "mediastinal": (40.0, 400.0), "bone": (400.0, 1800.0)}


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    lo = center - width / 2
    return np.clip((hu - lo) * (255.0 / width), 0, 255).astype(np.uint8)


def display(image: np.ndarray, display_window: tuple[float, float] | None = None) -> np.ndarray:
    """An 8-bit view of a domain's image: 8-bit images as they are; float images through the domain's
    (centre, width) window, or stretched min..max when it has none."""
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a
    if display_window is not None:
        return window(a.astype(np.float32), *display_window)
    lo, hi = float(np.min(a)), float(np.max(a))
    return window(a.astype(np.float32), (lo + hi) / 2, max(hi - lo, 1e-6))


OUTLINE_DEFAULT_COLOR = (255, 0, 0)  # a class the table gives no colour
INSTANCE_COLOR = (255, 220, 0)


def _draw_class_outlines(canvas: np.ndarray, label: np.ndarray, ids, ink, thickness: int) -> None:
    """Draw the outer contour of each class in ``ids`` onto ``canvas`` with ``ink(k)``, in order (later over
    earlier)."""
    for k in ids:
        m = (label == k).astype(np.uint8)
        if not m.any():
            continue
        cs, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, cs, -1, ink(k), thickness)


def _draw_instance_outlines(canvas: np.ndarray, instance: np.ndarray, ink, thickness: int) -> None:
    for k in _nonzero_ids(instance):
        cs, _ = cv2.findContours((instance == k).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, cs, -1, ink, thickness)


def _ids(label: np.ndarray, classes: list[int] | None) -> list[int]:
    return list(classes) if classes is not None else [int(k) for k in np.unique(label) if k]


def outline(img8: np.ndarray, label: np.ndarray, table: ClassTable, classes: list[int] | None = None,
            thickness: int = 1) -> np.ndarray:
    """Outline the given classes (all non-zero by default) in their table colours over a grey or RGB image."""
    rgb = cv2.cvtColor(img8, cv2.COLOR_GRAY2RGB) if img8.ndim == 2 else img8.copy()
    _draw_class_outlines(rgb, label, _ids(label, classes), lambda k: table.colors.get(k, OUTLINE_DEFAULT_COLOR),
                         thickness)
    return rgb


def _nonzero_ids(a: np.ndarray) -> np.ndarray:
    """The distinct non-zero values of an id map, ascending (``np.unique`` without 0; a count of the labelled pixels
    for unsigned maps, a few times faster than sorting the whole map)."""
    a = np.asarray(a)
    if a.dtype == np.uint8 and a.ndim == 2 and a.size < (1 << 24):  # OpenCV's histogram: exact counts below 2^24
        counts = cv2.calcHist([np.ascontiguousarray(a)], [0], None, [256], [0, 256]).ravel()
        return np.flatnonzero(counts[1:]) + 1
    if a.dtype.kind in "ub":
        fg = a[a > 0]
        return np.flatnonzero(np.bincount(fg.astype(np.intp, copy=False))) if fg.size else np.zeros(0, np.intp)
    return np.array([k for k in np.unique(a) if k])


def instance_outline(img8: np.ndarray, instance: np.ndarray, color=INSTANCE_COLOR, thickness: int = 1) -> np.ndarray:
    rgb = cv2.cvtColor(img8, cv2.COLOR_GRAY2RGB) if img8.ndim == 2 else img8.copy()
    _draw_instance_outlines(rgb, instance, color, thickness)
    return rgb


def outline_layer(label: np.ndarray, instance: np.ndarray, table: ClassTable | None, classes: list[int] | None = None,
                  thickness: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
    """The outlines ``instance_outline(outline(view, label, table, classes), instance)`` draws, without the view: an
    HxW uint8 index map (0 = nothing drawn, 1..n = the n classes' outlines in order, n + 1 = finding instances),
    its (n + 2) x 3 RGB palette and the transparent index (0). Laid over the view (an indexed PNG whose index 0 is
    transparent), it shows exactly the pixels of the drawn overlay; it compresses to a few KB where the RGB overlay
    takes hundreds (and with at most 14 classes the PNG packs two pixels a byte). ``table`` None: instance outlines
    only."""
    lab = np.asarray(label)
    ids = _ids(lab, classes) if table is not None else []
    index = {k: min(j + 1, 254) for j, k in enumerate(ids)}  # (more than 254 outlined classes share the last index)
    ink = min(len(ids) + 1, 255)
    canvas = np.zeros(lab.shape[:2], np.uint8)
    _draw_class_outlines(canvas, lab, ids, index.__getitem__, thickness)
    _draw_instance_outlines(canvas, np.asarray(instance), ink, thickness)
    palette = np.zeros((ink + 1, 3), np.uint8)
    for k in ids:
        palette[index[k]] = table.colors.get(k, OUTLINE_DEFAULT_COLOR)
    palette[ink] = INSTANCE_COLOR
    return canvas, palette, 0


def closed_regions(label: np.ndarray, ids: list[int], size_px: int = 7) -> np.ndarray:
    """A copy of ``label`` keeping only ``ids``, each closed morphologically so small inclusions (vessels in a
    lobe) do not break its outline. For display only: never a label."""
    out = np.zeros_like(label)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size_px, size_px))
    for i in ids:
        m = cv2.morphologyEx((label == i).astype(np.uint8), cv2.MORPH_CLOSE, k)
        out[(m > 0) & (out == 0)] = i
    return out
