"""Chest-CT core: shorthand, specs, phantom geometry, measurements, QC retries, determinism, preview."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from annotators.ct import feret_axes, lung_rads_size_category
from flows.pipeline import make_sample, make_samples
from flows.preview import parse_text, run_preview
from schemas.classes import CT_CLASSES, LOBES
from schemas.errors import SpecError
from schemas.shorthand import parse_finding
from schemas.spec import load_spec, load_spec_text, spec_hash, spec_json_schema, validate_spec


# ------------------------------------------------------------------------------------------- shorthand
@pytest.mark.parametrize("text,kind,lo,hi,lobe,count,margin", [
    ("8mm nodule, right upper lobe", "solid", 8, 8, "RUL", 1, "smooth"),
    ("0.8 cm GGN in the RUL", "ground_glass", 8, 8, "RUL", 1, "smooth"),
    ("2 solid nodules 4-6 mm, left lower lobe", "solid", 4, 6, "LLL", 2, "smooth"),
    ("spiculated nodule 12mm LLL", "solid", 12, 12, "LLL", 1, "spiculated"),
    ("part-solid nodule 15 mm right middle lobe", "part_solid", 15, 15, "RML", 1, "smooth"),
    ("LOBULATED Solid Nodule 1.2 CM in the Lingula", "solid", 12, 12, "LUL", 1, "lobulated"),
    ("three 5 mm nodules", "solid", 5, 5, "any", 3, "smooth"),
])
def test_shorthand_examples_normalise(text, kind, lo, hi, lobe, count, margin):
    f = parse_finding(text)
    assert (f.kind, f.diameter_mm, f.location, f.count, f.margin) == (kind, (lo, hi), lobe, count, margin)


@pytest.mark.parametrize("text,names,accepted", [
    ("8 inch nodule RUL", "'inch'", "mm, cm"),
    ("8px nodule RUL", "'px'", "mm, cm"),
    ("0 mm nodule RUL", "0 mm is not positive", "2 to 40 mm"),
    ("-3mm nodule RUL", "'-3mm'", "positive length"),
    ("90mm nodule RUL", "90 mm is larger than RUL can hold", "up to 40 mm"),
    ("8mm nodule, left middle lobe", "no left middle lobe", "RUL/right upper lobe"),
    ("8mm nodule LML", "no left middle lobe", "LLL/left lower lobe"),
    ("solid ground-glass nodule 8mm RUL", "'ground-glass' and 'solid'", "part-solid (PSN)"),
    ("smooth spiculated nodule 8mm RUL", "'spiculated' and 'smooth'", "lobulated"),
    ("", "empty finding text", "8mm solid nodule"),
    ("   ", "empty finding text", "8mm solid nodule"),
    ("8mm nodule upper lobe", "'upper lobe' is ambiguous", "RUL or LUL"),
    ("8mm nodule RUL LLL", "'rul' and 'lll'", "LUL/left upper lobe"),
    ("8mm purple nodule RUL", "'purple'", "kinds solid"),
    ("8 nodule RUL", "no size", "mm, cm"),
    ("8mm 9mm nodule RUL", "'8mm' and '9mm'", "one diameter"),
])
def test_shorthand_rejections_name_the_words_and_the_accepted_values(text, names, accepted):
    with pytest.raises(SpecError) as e:
        parse_finding(text)
    msg = str(e.value)
    assert "\n" not in msg
    assert names in msg and accepted in msg, msg


def test_parse_text_gives_json_ready_finding():
    out = parse_text("0.8 cm GGN in the RUL")
    assert out["domain"] == "chest_ct"
    assert json.loads(json.dumps(out))["finding"]["diameter_mm"] == [8.0, 8.0]


# ------------------------------------------------------------------------------------------- specs
def test_example_spec_loads_from_yaml_and_json_identically(tmp_path):
    spec = load_spec("examples/chest_ct_nodules.yaml")
    p = tmp_path / "s.json"
    p.write_text(json.dumps(spec.model_dump(mode="json")))
    again = load_spec(p)
    assert spec_hash(again) == spec_hash(spec)
    assert spec.findings.mixture[1].count == 2 and spec.findings.mixture[1].weight == 2


def test_json_schema_describes_the_spec():
    schema = spec_json_schema()
    text = json.dumps(schema)
    assert "slice_level" in text and "findings" in text and "spacing_mm" in text


@pytest.mark.parametrize("patch,expect", [
    ({"samples": 0}, "samples"),
    ({"name": "../etc"}, "dataset name '../etc' is not allowed"),
    ({"splits": {"train": 0.5, "val": 0.1, "test": 0.1}}, "sum to 0.7"),
    ({"image": {"spacing_mm": [1.0, 0.5]}}, "min above max"),
    ({"findings": {"negatives": 0.1, "mixture": ["8mm nodule left middle lobe"]}}, "no left middle lobe"),
    ({"findings": {"negatives": 0.1, "mixture": [{"kind": "solid", "diameter_mm": 8, "location": "LML"}]}}, "LML"),
    ({"findings": {"negatives": 0.5, "mixture": []}}, "mixture is empty"),
    ({"schedule": "every night"}, "not a 5-field cron"),
    ({"colour": "red"}, "unknown field 'colour'"),
    ({"slice_level": [0.0, 0.3], "findings": {"negatives": 0, "mixture": ["8mm nodule RML"]}}, "RML does not appear"),
    ({"image": {"size": 128, "spacing_mm": 0.5}, "findings": {"negatives": 0, "mixture": ["20mm nodule RLL"]}},
     "larger than a lung can hold"),
])
def test_invalid_specs_fail_with_one_line_naming_the_field(patch, expect):
    base = {"name": "t", "domain": "chest_ct", "samples": 4, "seed": 1,
            "findings": {"negatives": 0.2, "mixture": ["8mm nodule RUL"]}}
    base.update(patch)
    with pytest.raises(SpecError) as e:
        validate_spec(base)
    assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_invalid_yaml_names_the_line():
    with pytest.raises(SpecError, match="invalid YAML at line 2"):
        load_spec_text("name: a\n  samples: [1,\n", source="x.yaml")


def test_unknown_domain_lists_known_ones():
    with pytest.raises(SpecError, match="domain 'mri' is not known; accepted: .*chest_ct"):
        validate_spec({"name": "a", "domain": "mri", "samples": 1})


# ------------------------------------------------------------------------------------------- geometry
ACCURACY_SPEC = {
    "name": "accuracy", "domain": "chest_ct", "samples": 48, "seed": 11,
    "image": {"size": 512, "spacing_mm": [0.5, 1.0]},
    "findings": {"negatives": 0.0, "mixture": [
        {"kind": "solid", "diameter_mm": [3, 30], "location": "any", "margin": "smooth"},
        {"kind": "part_solid", "diameter_mm": [6, 25], "location": "RLL", "margin": "lobulated"},
        {"kind": "ground_glass", "diameter_mm": [3, 20], "location": "LUL"},
        {"kind": "solid", "diameter_mm": [3, 15], "location": "RML", "margin": "spiculated", "count": 2},
        {"kind": "solid", "diameter_mm": [3, 20], "location": "RUL", "margin": "lobulated"},
        {"kind": "solid", "diameter_mm": [3, 20], "location": "LLL"},
    ]},
}


@pytest.fixture(scope="module")
def accuracy_samples():
    spec = validate_spec(ACCURACY_SPEC)
    return spec, make_samples(spec, range(spec.samples))


def test_nodule_diameter_matches_request_within_half_mm_or_a_pixel(accuracy_samples):
    _, samples = accuracy_samples
    n = 0
    for s in samples:
        for req, m in zip(s.requested, s.measured):
            tol = max(0.5, s.spacing_mm)
            assert abs(m["equivalent_diameter_mm"] - req["diameter_mm"]) <= tol, (s.sample_id, req, m)
            n += 1
    assert n >= 48


def test_nodules_lie_in_the_requested_lobe(accuracy_samples):
    _, samples = accuracy_samples
    lobes_seen = set()
    for s in samples:
        for req, m in zip(s.requested, s.measured):
            if req["requested_location"] != "any":
                assert m["lobe"] == req["requested_location"]
            assert m["in_region_fraction"] >= 0.99, (s.sample_id, m)
            lobe_id = LOBES[m["lobe"]]
            # the label under the finding sits inside lung of that lobe in the lobe map
            assert req["lobe"] == m["lobe"]
            lobes_seen.add(lobe_id)
    assert lobes_seen == set(LOBES.values())


def test_every_sample_passes_qc_and_records_every_check(accuracy_samples):
    _, samples = accuracy_samples
    for s in samples:
        names = {c["name"] for c in s.qc["checks"]}
        assert {"median_hu_lung", "median_hu_muscle", "finding_count"} <= names
        assert s.qc["passed"], s.qc
        assert len(s.qc["history"]) == s.qc["attempts"]


def test_label_map_uses_the_fixed_class_table_and_instances_match_findings(accuracy_samples):
    _, samples = accuracy_samples
    for s in samples[:10]:
        assert s.label.dtype == np.uint8 and s.instance.dtype == np.uint16
        assert set(np.unique(s.label)) <= set(CT_CLASSES.names)
        ids = set(np.unique(s.instance)) - {0}
        assert ids == {f["instance"] for f in s.requested}
        nodule_px = np.isin(s.label, [20, 21])
        assert np.array_equal(nodule_px, s.instance > 0)


def test_tissue_hu_medians_fall_in_published_ranges(accuracy_samples):
    _, samples = accuracy_samples
    s = samples[0]
    assert -950 < np.median(s.image[np.isin(s.label, list(LOBES.values()))]) < -750
    assert -130 < np.median(s.image[s.label == CT_CLASSES.id("subcutaneous_fat")]) < -70
    assert 20 < np.median(s.image[s.label == CT_CLASSES.id("muscle")]) < 70
    assert s.image.dtype == np.float32 and s.image.min() >= -1024 and s.image.max() <= 3071


def test_noise_is_spatially_correlated_not_white(accuracy_samples):
    _, samples = accuracy_samples
    s = samples[0]
    air = s.image[:40, :200].astype(np.float64)  # air above the body
    a = air - air.mean()
    r1 = (a[:, 1:] * a[:, :-1]).mean() / a.var()
    assert abs(r1) > 0.2, r1  # white noise would give ~0


def test_part_solid_has_a_solid_core_inside_ground_glass(accuracy_samples):
    _, samples = accuracy_samples
    found = False
    for s in samples:
        for f in s.requested:
            if f["kind"] == "part_solid":
                m = s.instance == f["instance"]
                solid = (s.label == 20) & m
                gg = (s.label == 21) & m
                assert solid.sum() > 0 and gg.sum() > solid.sum()
                assert s.image[solid].mean() > s.image[gg].mean() + 300
                found = True
    assert found


# ------------------------------------------------------------------------------------------- measurement
@pytest.mark.parametrize("d_px", [3, 8, 21, 40])
def test_feret_axes_of_a_disk_match_its_diameter(d_px):
    img = np.zeros((64, 64), np.uint8)
    cv2.circle(img, (32, 32), d_px // 2, 1, -1)
    long_ax, short_ax = feret_axes(img.astype(bool))
    eq = 2 * math.sqrt(img.sum() / math.pi)
    assert abs(long_ax - (d_px // 2 * 2 + 1)) <= 1.0
    assert abs(short_ax - long_ax) <= 1.5
    assert abs(eq - long_ax) <= 1.5


@pytest.mark.parametrize("kind,mean,solid,cat", [
    ("solid", 5.9, None, "2"), ("solid", 6.0, None, "3"), ("solid", 7.95, None, "4A"), ("solid", 8.0, None, "4A"),
    ("solid", 14.9, None, "4A"), ("solid", 15.0, None, "4B"), ("ground_glass", 29.9, None, "2"),
    ("ground_glass", 30.0, None, "3"), ("part_solid", 5.0, 2.0, "2"), ("part_solid", 10.0, 5.0, "3"),
    ("part_solid", 10.0, 7.0, "4A"), ("part_solid", 12.0, 8.0, "4B"),
])
def test_lung_rads_size_categories(kind, mean, solid, cat):
    assert lung_rads_size_category(kind, mean, solid) == cat


def test_failing_qc_is_regenerated_a_bounded_number_of_times_and_recorded():
    spec = validate_spec({"name": "q", "samples": 1, "seed": 3, "qc": {"max_attempts": 3, "cnr_min": 1e9},
                          "findings": {"negatives": 0, "mixture": ["8mm nodule RLL"]}})
    s = make_sample(spec, 0)
    assert s.qc["attempts"] == 3 and not s.qc["passed"]
    assert [h["attempt"] for h in s.qc["history"]] == [0, 1, 2]
    assert all("visible_1" in h["failed_checks"] for h in s.qc["history"])


# ------------------------------------------------------------------------------------------- determinism
def test_same_spec_and_seed_give_identical_bytes_and_sample_k_alone_equals_batch():
    spec = load_spec("examples/chest_ct_nodules.yaml")
    batch = make_samples(spec, range(6))
    again = make_samples(spec, range(6))
    alone = make_sample(spec, 4)
    for a, b in zip(batch, again):
        assert a.image.tobytes() == b.image.tobytes() and a.label.tobytes() == b.label.tobytes()
    assert alone.image.tobytes() == batch[4].image.tobytes()
    assert alone.label.tobytes() == batch[4].label.tobytes()
    assert alone.params == batch[4].params


def test_a_different_seed_changes_the_pixels():
    spec = load_spec("examples/chest_ct_nodules.yaml")
    other = validate_spec({**spec.model_dump(mode="json"), "seed": 43})
    assert make_sample(spec, 0).image.tobytes() != make_sample(other, 0).image.tobytes()


# ------------------------------------------------------------------------------------------- preview
def test_preview_writes_16bit_hu_image_label_overlay_and_json(tmp_path):
    files = run_preview("spiculated nodule 12mm LLL", tmp_path, n=2, seed=5)
    assert len(files) == 8
    img = cv2.imread(str(tmp_path / "0000000_image.png"), cv2.IMREAD_UNCHANGED)
    lab = cv2.imread(str(tmp_path / "0000000_label.png"), cv2.IMREAD_UNCHANGED)
    assert img.dtype == np.uint16 and lab.dtype == np.uint8 and img.shape == lab.shape
    meta = json.loads((tmp_path / "0000000.json").read_text())
    assert meta["measured"][0]["lobe"] == "LLL"
    assert meta["class_table"]["20"] == "nodule_solid"
    s = make_sample(validate_spec(meta["spec"]), 0)
    # The preview stores pixels exactly as a published version does (the hu16 codec: HU + 1024, rounded).
    from store.codec import hu_to_stored

    assert np.array_equal(img, hu_to_stored(s.image))
    assert np.array_equal(lab, s.label)
