"""Surface spec, shorthand parser and bad-input errors: one readable SpecError line naming what is wrong."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from schemas.errors import SpecError
from schemas.spec import load_spec, spec_hash, validate_spec
from schemas.surface import SURFACE_CLASSES, parse_defect
from schemas.surface_shorthand import parse_defect_text

ROOT = Path(__file__).resolve().parents[1]


def _spec(**kw):
    d = {"domain": "surface", "name": "t", "samples": 4, "material": "brushed_metal", "field_of_view_mm": 50,
         "image": {"size": 512}, "defects": {"negatives": 0, "mixture": ["scratch 10 mm"]}}
    d.update(kw)
    return d


@pytest.mark.parametrize("text, kind, field, lo, hi, count, location, material", [
    ("2mm scratch top-left on brushed aluminium", "scratch", "length_mm", 2, 2, 1, "top_left", "brushed_metal"),
    ("3 pits 0.5-1 mm, cast iron", "pit", "diameter_mm", 0.5, 1, 3, "any", "cast_metal"),
    ("crack 40 mm, painted steel, bottom edge", "crack", "length_mm", 40, 40, 1, "bottom_edge", "painted"),
    ("scratch 2 cm long 0.3 mm wide, horizontal", "scratch", "width_mm", 0.3, 0.3, 1, "any", None),
    ("two dents diameter 3-5 mm, centre, injection-moulded plastic", "dent", "diameter_mm", 3, 5, 2, "center",
     "plastic"),
    ("chipped edge 5 mm, right edge, wood", "missing_material", "length_mm", 5, 5, 1, "right_edge", "wood"),
    ("contamination 0.4 mm on woven fabric", "particle", "diameter_mm", 0.4, 0.4, 1, "any", "textile"),
])
def test_shorthand_examples_normalise(text, kind, field, lo, hi, count, location, material):
    d, m = parse_defect_text(text)
    assert d.kind == kind and getattr(d, field) == (lo, hi) and d.count == count and d.location == location
    assert m == material


def test_shorthand_coordinates_and_angle():
    d = parse_defect("scratch 8 mm at (12, 30) mm at 30°")
    assert d.location.x_mm == 12 and d.location.y_mm == 30 and d.orientation_deg == (30, 30)


@pytest.mark.parametrize("text, names", [
    ("5mm blob", ["no defect kind", "scratch"]),
    ("scratch 2mm on steel", ["'steel'", "brushed"]),
    ("scratch 3 on wood", ["no size"]),
    ("scratch 2 mm top-left bottom-right", ["contradictory locations", "top-left"]),
    ("scratch 2 inch", ["unknown unit 'inch'", "mm, cm"]),
    ("scratch 2 mm shiny", ["unrecognised words 'shiny'", "kinds"]),
    ("chipped edge 5mm center", ["sits on an edge", "top edge"]),
    ("crack 2mm 3mm", ["several lengths"]),
    ("", ["empty defect text"]),
])
def test_shorthand_rejections_name_the_words_and_the_accepted_values(text, names):
    with pytest.raises(SpecError) as e:
        parse_defect_text(text)
    msg = str(e.value)
    assert "\n" not in msg
    for n in names:
        assert n in msg


def test_material_comes_from_the_shorthand_and_must_agree():
    s = validate_spec(_spec(material=None, defects={"mixture": ["scratch 5 mm on brushed aluminium"]}))
    assert s.material == "brushed_metal"
    with pytest.raises(SpecError, match="contradicts"):
        validate_spec(_spec(material="wood", defects={"mixture": ["scratch 5 mm on cast iron"]}))


def test_default_width_is_raised_to_one_and_a_half_pixels():
    s = validate_spec(_spec(field_of_view_mm=300, defects={"mixture": ["scratch 50 mm"]}))
    assert s.defects.mixture[0].width_mm[0] >= 1.5 * 300 / 512 - 1e-9


@pytest.mark.parametrize("patch, expect", [
    ({"material": "granite"}, "material"),
    ({"defects": {"mixture": [{"kind": "bubble", "diameter_mm": 2}]}}, "defects.mixture.0.kind"),
    ({"defects": {"mixture": ["scratch 80 mm"]}}, "larger than its region holds"),
    ({"defects": {"mixture": ["crack 30 mm, top-left"]}}, "larger than its region holds"),
    ({"defects": {"mixture": ["stain 12 mm, bottom edge"]}}, "larger than its region holds"),
    ({"defects": {"mixture": ["pit 0.1 mm"]}}, "under 3 pixels"),
    ({"defects": {"mixture": ["crack 40 mm vertical, bottom edge"]}}, "does not fit region bottom_edge"),
    ({"defects": {"mixture": ["hole 2 mm at (60, 10) mm"]}}, "outside the"),
    ({"defects": {"mixture": ["3 holes 2 mm at (20, 10) mm"]}}, "cannot share the point"),
    ({"field_of_view_mm": 0.5}, "field_of_view_mm"),
    ({"photos": {"folder": "/tmp"}}, "only used with material 'image'"),
    ({"material": "image"}, "needs photos"),
    ({"material": "image", "photos": {"folder": "/nonexistent/pairforge"}}, "not a readable folder"),
])
def test_invalid_specs_fail_with_one_line_naming_the_field(patch, expect):
    with pytest.raises(SpecError) as e:
        validate_spec(_spec(**patch))
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_empty_photo_folder_and_wrong_photo_size_are_spec_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photos here")
    with pytest.raises(SpecError, match="holds no photos"):
        validate_spec(_spec(material="image", photos={"folder": str(empty)}))
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    cv2.imwrite(str(wrong / "a.png"), np.zeros((300, 400), np.uint8))
    with pytest.raises(SpecError, match=r"'a.png' is 400x300 pixels but image.size is 512x512"):
        validate_spec(_spec(material="image", photos={"folder": str(wrong)}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "b.png").write_bytes(b"not a png")
    with pytest.raises(SpecError, match="cannot be read"):
        validate_spec(_spec(material="image", photos={"folder": str(broken)}))


def test_example_spec_loads_and_hash_is_stable():
    s = load_spec(ROOT / "examples" / "surface_defects.yaml")
    assert s.domain == "surface" and s.material == "brushed_metal" and len(s.defects.mixture) == 9
    assert spec_hash(s) == spec_hash(load_spec(ROOT / "examples" / "surface_defects.yaml"))


def test_class_table_has_every_defect_kind_and_distinct_colours():
    names = SURFACE_CLASSES.names
    assert [names[i] for i in range(1, 9)] == ["scratch", "crack", "dent", "pit", "stain", "hole", "particle",
                                               "missing_material"]
    assert len(set(SURFACE_CLASSES.colors.values())) == len(SURFACE_CLASSES.colors)
