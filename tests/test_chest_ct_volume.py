"""Chest-CT volumes: 3D nodule size and placement, vessel continuity, NIfTI orientation, reproducibility."""
from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from annotators.ct_volume import lung_rads_category, measure_volume_findings
from flows.volume import make_volume, volume_rng, write_volume
from generators.chest_ct_volume import draw_volume, draw_volume_anatomy, grow_trees
from generators.volume_pipeline import VolumeRequest, layout_volume
from schemas.volume import VOLUME_IDS, VolumeGeometry
from store.nifti import nifti_bytes, read_nifti

V = VOLUME_IDS
SMALL = VolumeRequest((40, 128, 128), (5.0, 2.8, 2.8), 0.5,
                      [{"kind": "part_solid", "diameter_mm": 16.0, "location": "RLL", "margin": "lobulated"}])


@pytest.mark.parametrize("spacing,d,kind,margin", [((0.625, 0.5, 0.5), 3.0, "solid", "smooth"),
                                                   ((2.5, 1.0, 1.0), 6.0, "ground_glass", "lobulated"),
                                                   ((1.25, 0.7, 0.7), 22.0, "solid", "spiculated")])
def test_nodule_volume_equivalent_diameter_matches_request(spacing, d, kind, margin):
    ext = 3 * d + 30
    shape = tuple(int(math.ceil(ext / s)) for s in spacing)
    req = VolumeRequest(shape, spacing, findings=[{"kind": kind, "diameter_mm": d, "location": "RLL", "margin": margin}],
                        center_on_lobe="RLL")
    lay = layout_volume(req, np.random.default_rng(3))
    m = measure_volume_findings(lay["label"], lay["instance"], lay["lobes"], lay["geometry"], lay["nodules"])[0]
    assert abs(m["equivalent_diameter_mm"] - d) <= max(0.5, spacing[2])
    assert m["lobe"] == "RLL" and m["in_lobe_fraction"] == 1.0
    assert not m["touches_pleura"] and not m["touches_fissure"]
    assert m["shell_in_lobe_fraction"] >= 0.99


def test_requested_volume_mm3_is_met_to_one_voxel():
    spacing = (1.0, 0.6, 0.6)
    req = VolumeRequest((70, 110, 110), spacing, findings=[{"kind": "solid", "diameter_mm": 10.0, "volume_mm3": 600.0,
                                                            "location": "LUL"}], center_on_lobe="LUL")
    lay = layout_volume(req, np.random.default_rng(5))
    m = measure_volume_findings(lay["label"], lay["instance"], lay["lobes"], lay["geometry"], lay["nodules"])[0]
    assert abs(m["volume_mm3_exact"] - 600.0) <= 0.5 * lay["geometry"].voxel_mm3


def test_vessels_do_not_appear_or_vanish_between_slices_away_from_branch_ends():
    """Rule: every 2D component of the pulmonary-vessel label on an inner slice overlaps (3x3) vessel label on
    the slice above or below, unless it holds a branch end (a terminal segment's end within 2 px and one slice),
    touches the lung border (where a vessel leaves the lobe map: hilum or pleura), an airway crossing it, or a
    nodule."""
    P = draw_volume_anatomy(np.random.default_rng(11))
    trees = grow_trees(P)
    H = P["lung_height_mm"]
    g = VolumeGeometry((48, 192, 192), (2.5, 1.6, 1.6), (0.55 * H, 0.0, 0.0))
    lay = draw_volume(P, g, fissure=False, trees=trees)
    ves = lay["label"] == V["pulmonary_vessel"]
    lungish = np.isin(lay["label"], [12, 13, 14, 15, 16, 17])
    t = trees["vessel"]
    ends = g.to_index(t.p1[t.terminal])
    ends = np.round(ends).astype(int)
    inside = np.all((ends >= 0) & (ends < np.asarray(g.shape)), axis=1)
    end_mask = np.zeros(g.shape, bool)
    end_mask[tuple(ends[inside].T)] = True
    end_mask = ndimage.binary_dilation(end_mask, np.ones((3, 5, 5), bool))
    border = ndimage.binary_dilation(~lungish, np.ones((3, 3), bool)[None])
    checked = bad = 0
    for k in range(1, g.shape[0] - 1):
        comps, n = ndimage.label(ves[k], np.ones((3, 3), bool))
        if n == 0:
            continue
        near = ndimage.binary_dilation(ves[k - 1] | ves[k + 1], np.ones((3, 3), bool))
        cont = ndimage.maximum(near, comps, np.arange(1, n + 1))
        exempt = ndimage.maximum(end_mask[k] | border[k], comps, np.arange(1, n + 1))
        checked += n
        bad += int(np.sum(~cont.astype(bool) & ~exempt.astype(bool)))
    assert checked > 200
    assert bad == 0, f"{bad} of {checked} vessel cross-sections appear or vanish away from branch ends"


def test_nifti_affine_is_ras_and_round_trips_through_monai_and_torchio(tmp_path):
    vol = make_volume(SMALL, seed=1, index=0)
    paths = write_volume(vol, tmp_path, "v0")
    img = nib.load(paths["image"])
    assert nib.aff2axcodes(img.affine) == ("L", "P", "I")
    assert np.allclose(np.abs(np.diag(img.affine)[:3]), [2.8, 2.8, 5.0])
    assert img.shape == (128, 128, 40)
    arr, aff = read_nifti(open(paths["image"], "rb").read())
    assert np.array_equal(arr, vol["image"])
    from monai.transforms import LoadImaged

    d = LoadImaged(keys=["image", "label"], image_only=False)({"image": paths["image"], "label": paths["label"]})
    assert tuple(d["image"].shape) == (128, 128, 40)
    assert np.allclose(np.asarray(d["image"].affine), img.affine)
    assert np.array_equal(np.asarray(d["label"]).astype(np.uint8), vol["label"].transpose(2, 1, 0))
    import torchio as tio

    s = tio.Subject(ct=tio.ScalarImage(paths["image"]), seg=tio.LabelMap(paths["label"]))
    assert s.ct.orientation == ("L", "P", "I")
    assert np.allclose(s.ct.spacing, (2.8, 2.8, 5.0))
    # the centroid of the nodule in patient mm agrees between the sidecar and the file's affine
    m = vol["measured"][0]
    ijk = np.array(m["centroid_ijk"] + [1.0])
    ras = img.affine @ ijk
    assert np.allclose([-ras[0], -ras[1], ras[2]], m["centroid_lps_mm"], atol=1e-3)


def test_same_seed_gives_identical_nifti_bytes_and_volume_alone_equals_batch():
    a = make_volume(SMALL, seed=7, index=2)
    batch = [make_volume(SMALL, seed=7, index=i) for i in range(3)]
    aff = a["geometry"].ras_affine()
    assert nifti_bytes(a["image"], aff) == nifti_bytes(batch[2]["image"], aff)
    assert nifti_bytes(a["label"], aff) == nifti_bytes(batch[2]["label"], aff)
    assert not np.array_equal(batch[0]["image"], batch[1]["image"])


def test_rng_streams_differ_by_index_and_attempt():
    assert volume_rng(0, 1).integers(1 << 30) != volume_rng(0, 2).integers(1 << 30)
    assert volume_rng(0, 1, 0).integers(1 << 30) != volume_rng(0, 1, 1).integers(1 << 30)


def test_lung_rads_v2022_categories_from_size():
    assert lung_rads_category("solid", 5.9, None) == "2"
    assert lung_rads_category("solid", 6.0, None) == "3"
    assert lung_rads_category("solid", 8.0, None) == "4A"
    assert lung_rads_category("solid", 15.0, None) == "4B"
    assert lung_rads_category("solid", 9.0, None, juxtapleural=True) == "2"
    assert lung_rads_category("part_solid", 10.0, 5.0) == "3"
    assert lung_rads_category("part_solid", 10.0, 7.0) == "4A"
    assert lung_rads_category("ground_glass", 29.9, None) == "2"
    assert lung_rads_category("ground_glass", 30.0, None) == "3"


def test_lungs_have_five_lobes_with_published_shares():
    """Lobe volume shares of the whole phantom lung near the published supine shares (PMC7490509:
    RUL 17.9, RML 9.3, RLL 26.5, LUL 23.1, LLL 23.2 %), each within 10 percentage points."""
    from generators.chest_ct_volume import lobe_atlas

    atlas, _ = lobe_atlas(draw_volume_anatomy(np.random.default_rng(2)))
    counts = np.bincount(atlas.ravel(), minlength=17)[12:17].astype(float)
    share = counts / counts.sum() * 100
    for got, want in zip(share, [17.9, 9.3, 26.5, 23.1, 23.2]):
        assert abs(got - want) <= 10, share


def test_dicom_series_and_seg_read_back_with_label_ids_and_geometry_of_the_nifti(tmp_path):
    import pydicom

    from schemas.volume import VOLUME_CLASSES
    from store.dicom_volume import read_seg_labels, write_dicom

    req = VolumeRequest((20, 96, 96), (5.0, 3.6, 3.6), 0.65,
                        [{"kind": "solid", "diameter_mm": 12.0, "location": "RLL"}])
    vol = make_volume(req, seed=3, index=0)
    g = vol["geometry"]
    out = write_dicom(vol["image"], vol["label"], g.lps_affine(), VOLUME_CLASSES.names, tmp_path, key="t-3-0")
    for p in out["ct"] + [out["seg"]]:
        pydicom.dcmread(p)  # every file parses
    ct0 = pydicom.dcmread(out["ct"][0])
    assert np.array_equal(ct0.pixel_array, vol["image"][0])
    lab, pos = read_seg_labels(out["seg"], out["ct"])
    assert np.array_equal(lab, vol["label"])
    assert (lab == V["nodule_solid"]).sum() == vol["measured"][0]["voxels"]
    ras = g.ras_affine()
    for k in (0, 19):
        r = ras @ np.array([0, 0, k, 1.0])
        assert np.allclose(pos[k], [-r[0], -r[1], r[2]], atol=1e-3)


def test_juxtapleural_nodule_touches_pleura_and_juxtavascular_touches_a_vessel():
    spacing = (1.25, 0.8, 0.8)
    for flag, check in (("juxtapleural", "touches_pleura"), ("juxtavascular", None)):
        req = VolumeRequest((64, 120, 120), spacing, findings=[{"kind": "solid", "diameter_mm": 7.0, "location": "RLL",
                                                               flag: True}], center_on_lobe="RLL")
        lay = layout_volume(req, np.random.default_rng(21))
        m = measure_volume_findings(lay["label"], lay["instance"], lay["lobes"], lay["geometry"], lay["nodules"])[0]
        assert abs(m["equivalent_diameter_mm"] - 7.0) <= 0.8 and m["in_lobe_fraction"] >= 0.99
        if check:
            assert m[check] and not m["touches_fissure"]
        else:
            box = tuple(slice(max(0, a - 2), b + 2) for a, b in lay["nodules"][0]["box"])
            ring = ndimage.binary_dilation(lay["instance"][box] == 1, iterations=2)
            assert (lay["label"][box][ring] == V["pulmonary_vessel"]).any()


def test_volume_spec_rejects_bad_input_in_one_line_and_plans_reproducibly():
    from schemas.errors import SpecError
    from schemas.volume_spec import plan_volume, validate_volume_spec

    good = {"name": "vol", "samples": 4, "volume": {"size": [64, 256, 256], "spacing_mm": [1.25, 0.7, 0.7]},
            "findings": {"negatives": 0, "mixture": [{"kind": "solid", "diameter_mm": [4, 8], "location": "RUL",
                                                      "volume_mm3": 200}]}}
    spec = validate_volume_spec(good)
    a, b = plan_volume(spec, 3), plan_volume(spec, 3)
    assert a == b and a["findings"][0]["volume_mm3"] == 200 and 4 <= a["findings"][0]["diameter_mm"] <= 8
    with pytest.raises(SpecError, match="spacing") as e:
        validate_volume_spec({**good, "volume": {"spacing_mm": [0.01, 0.7, 0.7]}})
    assert "\n" not in str(e.value)
    with pytest.raises(SpecError, match="juxtavascular|extra"):
        validate_volume_spec({**good, "findings": {"mixture": [{"diameter_mm": 5, "juxtavascularr": True}]}})


def test_nifti_codec_round_trips_and_every_slice_carries_the_watermark():
    from store import watermark as wm
    from store.codecs import get_codec
    import store.nifti  # noqa: F401  (registers the codec)

    req = VolumeRequest((12, 512, 512), (5.0, 0.7, 0.7), 0.6,
                        [{"kind": "solid", "diameter_mm": 10.0, "location": "RLL"}])
    vol = make_volume(req, seed=4, index=0)
    codec = get_codec("nifti_hu16")
    stored = codec.encode(vol["image"].astype(np.float32))
    pay = wm.payload_for("vol-test", 1, 0)
    keep = ndimage.binary_dilation(vol["instance"] > 0, iterations=2)
    marked = codec.watermark(stored, pay, keep)
    diff = np.abs(marked.astype(np.int32) - stored)
    assert diff.max() <= wm.CT_AMPLITUDE_HU and diff[keep].max() == 0
    data = codec.to_bytes(marked, {"affine_ras": vol["geometry"].ras_affine().tolist(), "sample": "0"})
    back = codec.from_bytes(data)
    assert np.array_equal(back, marked)
    det = wm.decode((back[6].astype(np.int32) + 1024).astype(np.uint16))
    assert det.found and det.payload == pay
