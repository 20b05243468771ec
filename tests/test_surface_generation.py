"""Surface layouts, rendering and measurement: sizes from the mask match the request, defects stay in their
regions, parameters are recorded and replayable, photos get defects on the part only."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from annotators import annotate
from flows.pipeline import backend_for, make_samples
from generators.defects import defect_shape
from schemas.errors import PlacementError
from schemas.plan import plan_sample
from schemas.seeding import STREAM_GENERATE, sample_rng
from schemas.spec import spec_hash, validate_spec
from schemas.surface import OUTSIDE_PART, part_box, region_box

ALL_DEFECTS = ["scratch 3-15 mm", "crack 5-20 mm", "2 dents 2-5 mm", "3 pits 0.6-1.2 mm", "stain 3-8 mm",
               "hole 1-3 mm", "2 particles 0.6-2 mm", "chipped edge 3-8 mm"]
MATERIALS = ["brushed_metal", "cast_metal", "painted", "plastic", "wood", "textile"]


def _spec(material="brushed_metal", fov=(30, 60), size=384, mixture=ALL_DEFECTS, negatives=0.0, color="grey", **kw):
    d = {"domain": "surface", "name": "t", "samples": 100, "material": material, "field_of_view_mm": list(fov),
         "image": {"size": size, "color": color}, "defects": {"negatives": negatives, "mixture": mixture}}
    d.update(kw)
    return validate_spec(d)


def _first_attempts(spec, indices):
    """Layout + render + annotate at attempt 0 only: no QC retry can hide a bad measurement."""
    digest, backend = spec_hash(spec), backend_for(spec)
    out = []
    for i in indices:
        req = plan_sample(spec, i, digest)
        rng = sample_rng(digest, i, STREAM_GENERATE, 0)
        try:
            lay = backend.layout(spec, req, rng)
        except PlacementError:
            continue
        img, _ = backend.render(lay, rng)
        out.append((req, lay, img, annotate("surface", img, lay, req, spec.qc)))
    return out


@pytest.fixture(scope="module")
def accuracy_runs():
    runs = []
    for j, material in enumerate(MATERIALS):
        fov = [(25, 40), (40, 60), (30, 50)][j % 3]
        runs += _first_attempts(_spec(material, fov=fov, color="rgb" if j % 2 else "grey"), range(12))
    return runs


def test_measured_sizes_match_request_within_max_of_0_2_mm_and_a_pixel(accuracy_runs):
    n, worst = 0, 0.0
    for req, lay, img, ann in accuracy_runs:
        tol = max(0.2, lay.spacing_mm)
        for f, m in zip(lay.findings, ann.measured):
            for q in ("length_mm", "width_mm", "diameter_mm"):
                if q in f:
                    err = abs(m[q] - f[q])
                    worst = max(worst, err / tol)
                    assert err <= tol + 1e-9, f"{f['kind']} {q}: measured {m[q]:.3f} vs requested {f[q]:.3f} mm"
                    n += 1
    assert n > 100 and worst > 0  # enough defects were measured, and the measurement is not a copy


def test_every_defect_lies_inside_its_requested_region(accuracy_runs):
    kinds = set()
    for req, lay, img, ann in accuracy_runs:
        for f, m in zip(lay.findings, ann.measured):
            assert m["in_region_fraction"] == 1.0, f"{f['kind']} in {f['region']}"
            kinds.add(f["kind"])
    assert len(kinds) == 8


def test_defects_pass_the_contrast_check_on_most_first_attempts(accuracy_runs):
    checks = [c for _, _, _, ann in accuracy_runs for c in ann.checks if c["name"].startswith("contrast")]
    passed = sum(c["passed"] for c in checks)
    assert passed >= 0.9 * len(checks)


def test_quadrants_edges_and_points_hold_their_defects():
    spec = _spec(fov=(50, 50), size=400, mixture=[
        "2 pits 0.5-1 mm, bottom-right", "scratch 10 mm, top-left", "crack 30 mm, bottom edge",
        "hole 2 mm at (10, 40) mm", "chipped edge 5 mm, left edge", "dent 3 mm, center"])
    seen = set()
    # A mixture of six entries drawn per sample: with this spec the first 32 samples hold every kind (16 did not
    # once shard_size, part of the spec hash and so of the seeds, changed its default).
    for req, lay, img, ann in _first_attempts(spec, range(32)):
        h, w = lay.label.shape
        for f in lay.findings:
            y0, x0, y1, x1 = region_box(f["region"], part_box(None, (h, w)), lay.spacing_mm,
                                        f.get("length_mm") or f.get("diameter_mm"))
            ys, xs = np.nonzero(lay.instance == f["instance"])
            assert ys.min() >= y0 and ys.max() < y1 and xs.min() >= x0 and xs.max() < x1
            if isinstance(f["region"], dict):  # the defect's centre is on the requested point
                cx, cy = (xs.min() + xs.max() + 1) / 2 * lay.spacing_mm, (ys.min() + ys.max() + 1) / 2 * lay.spacing_mm
                assert abs(cx - 10) <= lay.spacing_mm and abs(cy - 40) <= lay.spacing_mm
            if f["kind"] == "missing_material":
                assert xs.min() == 0  # a chip on the left edge starts at the part's edge
            seen.add(f["kind"])
    assert seen == {"pit", "scratch", "crack", "hole", "missing_material", "dent"}


def test_negatives_have_an_empty_mask_and_the_share_is_respected():
    spec = _spec(negatives=0.4, size=256, fov=(25, 35), mixture=["scratch 3-8 mm", "dent 2-4 mm"])
    samples = make_samples(spec, range(40))
    neg = [s for s in samples if not s.requested]
    assert 8 <= len(neg) <= 26
    for s in neg:
        assert not np.isin(s.label, range(1, 9)).any() and not s.instance.any() and s.qc["passed"]
    for s in samples:
        if s.requested:
            assert np.isin(s.label, range(1, 9)).any()


def test_same_spec_and_index_give_the_same_bytes_and_no_global_random_state_is_used():
    spec = _spec(size=256, fov=(25, 35))
    state = np.random.get_state()[1].copy()
    a = make_samples(spec, [3, 4])
    b = make_samples(spec, [3, 4])
    assert np.array_equal(np.random.get_state()[1], state)
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.label, y.label)
        assert x.params == y.params
    assert not np.array_equal(a[0].image, a[1].image)


def test_recorded_shape_parameters_rebuild_each_defect_mask_exactly():
    spec = _spec(size=384)
    for req, lay, img, ann in _first_attempts(spec, range(6)):
        for f, p in zip(lay.findings, lay.params["defects"]):
            shape = defect_shape(p)
            y, x = p["origin_px"]
            h, w = shape.mask.shape
            ys, xs = np.nonzero(shape.mask)
            rebuilt = np.zeros_like(lay.label, bool)
            rebuilt[ys + y, xs + x] = True
            assert np.array_equal(rebuilt, lay.instance == f["instance"])


def test_render_records_every_drawn_parameter_and_gives_uint8_grey_or_rgb():
    for color, ndim in (("grey", 2), ("rgb", 3)):
        s = make_samples(_spec("wood", size=256, fov=(25, 35), color=color), [1])[0]
        assert s.image.dtype == np.uint8 and s.image.ndim == ndim and s.image.shape[:2] == s.label.shape
        r = s.params["render"]
        assert "seed" in r["material"] and "seed" in r["camera"] and len(r["defects"]) == len(s.requested)
        assert all("model" in a for a in r["defects"])


def _photo_folder(tmp_path, n=2, size=320, with_masks=False):
    folder = tmp_path / "photos"
    folder.mkdir()
    masks = tmp_path / "masks"
    masks.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.full((size, size), 20, np.uint8)
        cv2.rectangle(img, (40 + 10 * i, 60), (280, 270), 170, -1)
        img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"part{i}.png"), img)
        m = np.zeros((size, size), np.uint8)
        cv2.rectangle(m, (40 + 10 * i, 60), (280, 270), 255, -1)
        cv2.imwrite(str(masks / f"part{i}.png"), m)
    return folder, masks


@pytest.mark.parametrize("use_masks", [False, True])
def test_photo_defects_sit_on_the_part_and_outside_is_labelled(tmp_path, use_masks):
    folder, masks = _photo_folder(tmp_path)
    photos = {"folder": str(folder)}
    if use_masks:
        photos["masks_folder"] = str(masks)
    # the photo folder is part of the spec, so the seed differs per run: 12 samples at 50 % negatives
    spec = _spec("image", fov=(40, 40), size=320, photos=photos, negatives=0.5,
                 mixture=["scratch 4-10 mm", "2 pits 0.5-1 mm", "stain 3-5 mm", "dent 2-4 mm, top-left"])
    samples = make_samples(spec, range(12))
    assert any(not s.requested for s in samples) and any(s.requested for s in samples)
    for s in samples:
        part = np.zeros(s.label.shape, bool)
        x0 = 40 + 10 * int(s.params["layout"]["photo"][-5])
        part[60:271, x0:281] = True
        assert (s.label == OUTSIDE_PART).sum() > 0
        differ = int(((s.label != OUTSIDE_PART) != part).sum())
        assert differ == 0 if use_masks else differ <= 8  # the given mask exactly; Otsu up to the blurred corners
        defect = s.instance > 0
        assert not (defect & ~part).any()
        for m in s.measured:
            assert m["in_region_fraction"] == 1.0
        assert s.qc["passed"]


def test_requested_orientation_is_the_measured_direction_of_the_line():
    spec = _spec(size=384, fov=(40, 40), mixture=["scratch 15 mm at 30°", "scratch 15 mm vertical"])
    n = 0
    for req, lay, img, ann in _first_attempts(spec, range(8)):
        for f, m in zip(lay.findings, ann.measured):
            diff = abs((m["orientation_deg"] - f["orientation_deg"] + 90) % 180 - 90)
            assert diff < 4.0, (f["orientation_deg"], m["orientation_deg"])
            n += 1
    assert n >= 6
