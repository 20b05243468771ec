"""Hostile and malformed input, fuzzed: both shorthand parsers and the spec loader end in acceptance or a one-line
SpecError for every input, never another exception, a traceback or a hang. A few hundred inputs per target here;
``bench/bench_fuzz.py`` runs >= 10,000 per target."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from schemas.errors import SpecError
from bench.fuzz_targets import (CT_TEXT, SURFACE_TEXT, hostile_specs, load_spec, parse_ct, parse_surface,
                                run_target, spec_documents)

FUZZ = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@FUZZ
@given(CT_TEXT)
def test_ct_shorthand_parses_or_refuses_in_one_line(text):
    assert run_target(parse_ct, text) in ("ok", "refused")


@FUZZ
@given(SURFACE_TEXT)
def test_surface_shorthand_parses_or_refuses_in_one_line(text):
    assert run_target(parse_surface, text) in ("ok", "refused")


@FUZZ
@given(spec_documents())
def test_spec_loader_validates_or_refuses_in_one_line(text):
    assert run_target(load_spec, text) in ("ok", "refused")


@pytest.mark.parametrize("name", sorted(hostile_specs()))
def test_hostile_spec_is_refused_in_one_line_for_the_right_reason(name):
    text, word = hostile_specs()[name]
    if not word:
        assert run_target(load_spec, text) == "ok"
        return
    with pytest.raises(SpecError) as e:
        load_spec(text)
    msg = str(e.value)
    assert "\n" not in msg and word.lower() in msg.lower(), msg


def test_known_phrases_still_parse():
    """The fuzz targets call the real parsers: good phrases are accepted (so 'refused' above means something)."""
    assert run_target(parse_ct, "8mm solid nodule, right upper lobe") == "ok"
    assert run_target(parse_surface, "2 mm scratch on brushed aluminium, top-left") == "ok"
    assert run_target(parse_ct, "left middle lobe nodule 5 mm") == "refused"
