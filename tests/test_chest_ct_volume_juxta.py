"""Chest-CT volumes: juxtapleural and juxtavascular nodules in small crops, judged from the label alone."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from annotators.ct_volume import measure_volume_findings
from generators.nodule_volume import NoPleuraError, place_nodules
from generators.volume_pipeline import VolumeRequest, layout_volume
from schemas.classes import LOBES
from schemas.errors import PlacementError, SpecError
from schemas.volume import VOLUME_IDS, VolumeGeometry
from schemas.volume_contact import face_shell, shell_contact


def small_crop(d: float, spacing: tuple[float, float, float], lobe: str, **flags) -> VolumeRequest:
    """The accuracy bench's crop: max(50 mm, 3 d + 30 mm) on a side, centred on the lobe."""
    ext = max(50.0, 3.0 * d + 30)
    shape = (int(math.ceil(ext / spacing[0])), int(math.ceil(ext / spacing[1])), int(math.ceil(ext / spacing[2])))
    f = {"kind": "solid", "margin": "smooth", "diameter_mm": d, "location": lobe, **flags}
    return VolumeRequest(shape, spacing, findings=[f], center_on_lobe=lobe)


@pytest.mark.parametrize("lobe,d,spacing,kind,margin,seed", [
    ("RUL", 4.6, (1.9, 0.62, 0.62), "ground_glass", "spiculated", 1),
    ("RML", 9.0, (0.7, 0.9, 0.9), "solid", "lobulated", 2),
    ("RLL", 14.0, (2.4, 0.55, 0.55), "part_solid", "smooth", 3),
    ("LUL", 3.1, (0.625, 0.5, 0.5), "solid", "smooth", 4),
    ("LLL", 7.5, (1.25, 1.0, 1.0), "solid", "spiculated", 5),
])
def test_juxtapleural_nodule_in_a_small_crop_is_placed_and_the_label_shows_pleural_contact(lobe, d, spacing, kind,
                                                                                            margin, seed):
    req = small_crop(d, spacing, lobe, juxtapleural=True)
    req.findings[0].update(kind=kind, margin=margin)
    lay = layout_volume(req, np.random.default_rng(seed))
    g = lay["geometry"]
    m = measure_volume_findings(lay["label"], lay["instance"], lay["lobes"], g, lay["nodules"])[0]
    assert abs(m["equivalent_diameter_mm"] - d) <= max(0.5, g.spacing[2])
    assert m["touches_pleura"] and not m["touches_fissure"]
    assert m["lobe"] == lobe and m["in_lobe_fraction"] >= 0.99
    # every nodule voxel lies in the requested lobe of the phantom (none painted over the chest wall)
    assert (lay["lobes"][lay["instance"] == 1] == LOBES[lobe]).all()


@pytest.mark.parametrize("lobe,seed", [("RLL", 7), ("LUL", 8)])
def test_juxtavascular_nodule_in_a_small_crop_touches_a_vessel_and_neither_pleura_nor_fissure(lobe, seed):
    req = small_crop(6.0, (1.25, 0.7, 0.7), lobe, juxtavascular=True)
    lay = layout_volume(req, np.random.default_rng(seed))
    m = measure_volume_findings(lay["label"], lay["instance"], lay["lobes"], lay["geometry"], lay["nodules"])[0]
    assert not m["touches_pleura"] and not m["touches_fissure"]
    ring = ndimage.binary_dilation(lay["instance"] == 1, iterations=2)
    assert (lay["label"][ring] == VOLUME_IDS["pulmonary_vessel"]).any()


def test_juxtapleural_request_in_a_lobe_without_pleura_in_view_fails_in_one_readable_line():
    """A grid that is all RLL parenchyma shows no pleura: the placement says so (a PlacementError the pipeline
    retries, and a SpecError for callers judging the request)."""
    geom = VolumeGeometry((30, 40, 40), (1.0, 1.0, 1.0))
    lobes = np.full(geom.shape, LOBES["RLL"], np.uint8)
    label = lobes.copy()
    instance = np.zeros(geom.shape, np.uint8)
    f = {"kind": "solid", "diameter_mm": 5.0, "location": "RLL", "juxtapleural": True}
    with pytest.raises(NoPleuraError) as e:
        place_nodules(np.random.default_rng(0), [f], geom, lobes, label, instance)
    assert isinstance(e.value, SpecError) and isinstance(e.value, PlacementError)
    assert "\n" not in str(e.value) and "RLL" in str(e.value) and "juxtapleural: false" in str(e.value)
    assert not instance.any()


def test_contact_rule_shell_is_the_face_neighbour_dilation_and_reads_pleura_fissure_and_vessel():
    rng = np.random.default_rng(0)
    m = ndimage.binary_opening(rng.random((12, 13, 14)) > 0.6)
    assert np.array_equal(face_shell(m), ndimage.binary_dilation(m) & ~m)
    lab = np.full((7, 7, 7), LOBES["RLL"], np.uint8)
    mask = np.zeros_like(lab, bool)
    mask[2:5, 2:5, 2:5] = True
    lab[mask] = VOLUME_IDS["nodule_solid"]
    assert shell_contact(lab, mask, LOBES["RLL"]) == {"shell_in_lobe_fraction": 1.0, "touches_pleura": False,
                                                      "touches_fissure": False, "touches_vessel": False}
    lab[1, 1, 1] = VOLUME_IDS["muscle"]  # diagonal only: not a face neighbour, no contact
    assert not shell_contact(lab, mask, LOBES["RLL"])["touches_pleura"]
    lab[1, 3, 3] = VOLUME_IDS["muscle"]
    lab[5, 3, 3] = LOBES["RML"]
    lab[3, 1, 3] = VOLUME_IDS["pulmonary_vessel"]  # set aside: neither pleura nor lobe
    c = shell_contact(lab, mask, LOBES["RLL"])
    assert c["touches_pleura"] and c["touches_fissure"] and c["touches_vessel"]
    assert c["shell_in_lobe_fraction"] == round(51 / 53, 5)


def test_juxtapleural_volume_is_byte_identical_for_the_same_seed_and_alone_equals_batch():
    from flows.volume import make_volume
    from store.nifti import nifti_bytes

    req = VolumeRequest((40, 128, 128), (5.0, 2.8, 2.8), 0.6,
                        [{"kind": "solid", "diameter_mm": 12.0, "location": "RLL", "juxtapleural": True},
                         {"kind": "ground_glass", "diameter_mm": 8.0, "location": "LUL", "juxtavascular": True}])
    a = make_volume(req, seed=5, index=1)
    batch = [make_volume(req, seed=5, index=i) for i in range(2)]
    aff = a["geometry"].ras_affine()
    assert nifti_bytes(a["image"], aff) == nifti_bytes(batch[1]["image"], aff)
    assert nifti_bytes(a["label"], aff) == nifti_bytes(batch[1]["label"], aff)
    assert a["measured"][0]["touches_pleura"] and not a["measured"][1]["touches_pleura"]
