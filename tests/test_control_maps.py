"""Control maps from images via controlnet-aux: weight-free maps run here, weighted ones only from a local folder."""
from __future__ import annotations

import numpy as np
import pytest

from annotators.control_maps import NO_WEIGHTS, available_control_maps, control_map, control_maps
from flows.pipeline import make_samples
from schemas.errors import SpecError
from schemas.spec import validate_spec


@pytest.fixture(scope="module")
def scratched():
    spec = validate_spec({"domain": "surface", "name": "t", "samples": 2, "material": "painted",
                          "field_of_view_mm": 30, "image": {"size": 200, "color": "rgb"},
                          "defects": {"negatives": 0, "mixture": ["crack 10-15 mm 0.4-0.6 mm wide"]}})
    return make_samples(spec, [0])[0]


def test_weight_free_maps_have_the_image_size_and_canny_finds_the_crack(scratched):
    maps = control_maps(scratched.image, rng=np.random.default_rng(0))
    assert set(maps) == set(NO_WEIGHTS)
    for m in maps.values():
        assert m.dtype == np.uint8 and m.shape == scratched.image.shape  # 200 px: not a multiple of 64
    edges = maps["canny"][..., 0] > 0
    near = np.zeros_like(edges)
    ys, xs = np.nonzero(scratched.instance)
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            near[np.clip(ys + dy, 0, 199), np.clip(xs + dx, 0, 199)] = True
    assert edges[near].mean() > 5 * max(edges[~near].mean(), 1e-3)  # edges concentrate on the crack
    assert maps["lineart_standard"][near].mean() > maps["lineart_standard"][~near].mean()


def test_content_shuffle_is_deterministic_given_the_rng(scratched):
    a = control_map(scratched.image, "content_shuffle", rng=np.random.default_rng(5))
    b = control_map(scratched.image, "content_shuffle", rng=np.random.default_rng(5))
    c = control_map(scratched.image, "content_shuffle", rng=np.random.default_rng(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(SpecError, match="rng"):
        control_map(scratched.image, "content_shuffle")


def test_weighted_maps_need_a_local_folder_and_never_download(tmp_path, scratched):
    assert available_control_maps(tmp_path) == list(NO_WEIGHTS)
    with pytest.raises(SpecError, match="needs weights"):
        control_map(scratched.image, "hed")
    with pytest.raises(SpecError, match="ControlNetHED.pth is not in"):
        control_map(scratched.image, "hed", weights_dir=tmp_path)
    with pytest.raises(SpecError, match="unknown control map 'sobel'"):
        control_map(scratched.image, "sobel")
    with pytest.raises(SpecError, match="8-bit"):
        control_map(scratched.image.astype(np.float32), "canny")
