"""Control images from label maps (generators/conditioning.py): palette, pad, Canny and line-art edges."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from generators.conditioning import (CANNY_HIGH, MIN_PALETTE_STEP, canny_image, class_table, control_image,
                                     lineart_image, pad_label, padded_size, palette_lut, segmentation_image)


def _ct_label(h: int = 100, w: int = 70) -> np.ndarray:
    lab = np.zeros((h, w), np.uint8)
    lab[20:60, 10:50] = 12  # right upper lobe
    lab[30:40, 20:30] = 20  # solid nodule
    lab[70:, :] = 4  # muscle, touching the bottom edge (the pad repeats it)
    return lab


@pytest.mark.parametrize("domain", ["chest_ct", "surface"])
def test_palette_gives_every_class_its_own_published_colour(domain):
    table = class_table(domain)
    lut, known = palette_lut(domain)
    assert set(np.nonzero(known)[0]) == set(table.names)
    for k, c in table.colors.items():
        assert tuple(lut[k]) == tuple(c)
    assert len({tuple(c) for c in table.colors.values()}) == len(table.names)


@pytest.mark.parametrize("domain", ["chest_ct", "surface"])
def test_palette_colours_differ_enough_for_canny_to_see_every_class_boundary(domain):
    colors = class_table(domain).colors.values()
    step = min(max(abs(int(a) - int(b)) for a, b in zip(c1, c2)) for c1, c2 in itertools.combinations(colors, 2))
    assert step >= MIN_PALETTE_STEP and 4 * MIN_PALETTE_STEP > CANNY_HIGH


def test_canny_finds_the_boundary_between_every_pair_of_ct_classes():
    ids = sorted(class_table("chest_ct").names)
    for a, b in itertools.combinations(ids, 2):
        lab = np.full((64, 64), a, np.uint8)
        lab[:, 32:] = b
        edges = canny_image(lab, "chest_ct", "opencv")[:, :, 0]
        rows_with_edge = (edges[:, 30:34] > 0).any(axis=1)
        assert rows_with_edge[4:-4].all(), f"no edge between classes {a} and {b}"
        assert not edges[:, :28].any() and not edges[:, 36:].any()


def test_pad_appends_bottom_right_to_a_multiple_of_64_by_edge_replication():
    lab = _ct_label()
    padded, pad = pad_label(lab)
    assert padded.shape == (128, 128) == padded_size(100, 70) and pad == (28, 58)
    assert np.array_equal(padded[:100, :70], lab)
    assert np.array_equal(padded[100:, :70], np.repeat(lab[-1:, :], 28, axis=0))
    assert np.array_equal(padded[:, 70:], np.repeat(padded[:, 69:70], 58, axis=1))
    already, none = pad_label(np.zeros((128, 64), np.uint8))
    assert already.shape == (128, 64) and none == (0, 0)


def test_control_images_are_pixel_aligned_with_the_label():
    lab = _ct_label()
    padded, _ = pad_label(lab)
    seg = control_image("segmentation", padded, "chest_ct")
    assert seg.shape == (128, 128, 3) and seg.dtype == np.uint8
    assert np.array_equal(seg[:100, :70], segmentation_image(lab, "chest_ct"))
    edges = control_image("canny", padded, "chest_ct", "opencv")[:, :, 0] > 0
    # The nodule's left boundary (column 20) is an edge at its rows, and nothing is drawn far from any boundary.
    assert edges[32:38, 19:21].any(axis=1).all()
    assert not edges[0:15, 60:].any()


@pytest.mark.parametrize("fn", [canny_image, lineart_image])
def test_controlnet_aux_and_opencv_annotators_give_identical_maps(fn):
    padded, _ = pad_label(_ct_label())
    a = fn(padded, "chest_ct", "controlnet_aux")
    b = fn(padded, "chest_ct", "opencv")
    assert a.shape == b.shape == (128, 128, 3)
    assert np.array_equal(a, b) and a.any()


def test_unknown_class_ids_and_off_grid_edge_maps_are_errors():
    lab = np.zeros((64, 64), np.uint8)
    lab[0, 0] = 200
    with pytest.raises(ValueError, match="200"):
        segmentation_image(lab, "chest_ct")
    with pytest.raises(ValueError, match="64-pixel grid"):
        canny_image(np.zeros((100, 64), np.uint8), "chest_ct", "opencv")
    with pytest.raises(ValueError, match="accepted"):
        control_image("depth", np.zeros((64, 64), np.uint8), "chest_ct")
