"""Fuzz targets for pairforge's input surfaces and the hypothesis strategies that feed them.

Every target takes one input and must end in exactly one of two ways: accepted, or refused with a ``SpecError``
whose text is one non-empty line. Anything else (another exception, a traceback, a hang, a multi-line message)
is a defect. ``tests/test_fuzz.py`` runs a few hundred inputs per target; ``bench/bench_fuzz.py`` runs
>= 10,000 per target and reports the counts.

Targets: the chest-CT shorthand, the surface-defect shorthand, the spec loader (YAML/JSON text), and the
command line's arguments (``pairforge`` in-process, argument parsing and input checks only: nothing is built).
"""
from __future__ import annotations

import json
import math
import os
import signal
import string
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from hypothesis import strategies as st

from schemas.domain import get_domain
from schemas.errors import SpecError
from schemas.spec import load_spec_text

HANG_S = 10.0  # an input that takes longer than this is a hang


class Defect(AssertionError):
    """An input that ended in anything but acceptance or a one-line SpecError."""


@contextmanager
def time_limit(seconds: float):
    """Raise Defect if the block runs longer than ``seconds`` (SIGALRM; main thread on Unix)."""
    def _alarm(signum, frame):
        raise Defect(f"hang: still running after {seconds:g} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def one_line(e: BaseException) -> str:
    msg = str(e)
    if not msg or "\n" in msg or len(msg) > 2000:
        raise Defect(f"refusal is not one readable line: {msg!r}")
    return msg


def run_target(fn: Callable[[Any], Any], value: Any) -> str:
    """'ok' or 'refused'; raises Defect on anything else."""
    try:
        with time_limit(HANG_S):
            fn(value)
    except SpecError as e:
        one_line(e)
        return "refused"
    except Defect:
        raise
    except BaseException as e:  # noqa: BLE001 - every other ending is what the fuzzer looks for
        raise Defect(f"{type(e).__name__}: {str(e)[:300]} for input {value!r:.300}") from e
    return "ok"


# ---------------------------------------------------------------------------------------------------- targets
def parse_ct(text: str) -> Any:
    return get_domain("chest_ct").parse_finding(text)


def parse_surface(text: str) -> Any:
    return get_domain("surface").parse_finding(text)


def load_spec(text: str) -> Any:
    spec = load_spec_text(text)
    # A spec that validates must also hash and dump: that is what a build does next.
    from schemas.spec import spec_hash

    spec_hash(spec)
    return spec


# ---------------------------------------------------------------------------------------------------- strategies
_SIZES = ["8mm", "8 mm", "0.8 cm", "4-6 mm", "4 to 6mm", ".5mm", "1e3mm", "-3 mm", "0 mm", "nan mm", "inf mm",
          "9" * 40 + " mm", "3 µm", "2 in", "8mmm", "8", "1/2 mm", "8,5 mm", "٣ mm", "８mm", "3-1 mm", "30 mm"]
_CT_WORDS = ["solid", "part-solid", "part solid", "psn", "ground-glass", "ggn", "ggo", "non-solid", "nodule",
             "nodules", "spiculated", "lobulated", "smooth", "juxtapleural", "right upper lobe", "RUL", "rml",
             "rll", "LUL", "lll", "left middle lobe", "upper lobe", "any lobe", "lingula", "two", "three", "x",
             "in the", "with", ",", ";", "(", ")", "ѕolid", "sоlid", "\u200b", "\x00", "\t", "\n", "../", "/etc/passwd"]
_SURFACE_WORDS = ["scratch", "crack", "dent", "pit", "stain", "hole", "particle", "chipped edge", "missing material",
                  "on brushed aluminium", "cast iron", "painted steel", "plastic", "wood", "textile", "photo",
                  "top-left", "top left quadrant", "bottom-right", "center", "left edge", "anywhere",
                  "at (10, 20) mm", "at (1e9, -5) mm", "horizontal", "vertical", "at 30°", "at 1e400 deg", "long",
                  "wide", "deep", "diameter", "three", "ѕcratch", "\x00", "../../x"]


def _phrases(words: list[str]) -> st.SearchStrategy[str]:
    token = st.one_of(st.sampled_from(words), st.sampled_from(_SIZES),
                      st.text(alphabet=string.ascii_letters + string.digits + " -.,", max_size=8))
    return st.lists(token, min_size=0, max_size=9).map(" ".join)


ANY_TEXT = st.text(max_size=200)  # arbitrary unicode, surrogates excluded by hypothesis' default
CT_TEXT = st.one_of(_phrases(_CT_WORDS), ANY_TEXT)
SURFACE_TEXT = st.one_of(_phrases(_SURFACE_WORDS), ANY_TEXT)

_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10 ** 30), max_value=10 ** 30),
    st.sampled_from([0, 1, -1, 2 ** 63, 10 ** 400, 4096, 4097, 10 ** 9]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["../../etc", "/abs/path", "a\x00b", "ｃｈｅｓｔ＿ｃｔ", "chest_ct", "surface", "8mm solid nodule, RUL",
                     "2 mm scratch on brushed aluminium, top-left", "* * * * *", "99 99 99 99 99"]))
_KEYS = st.sampled_from(["name", "domain", "samples", "seed", "image", "size", "spacing_mm", "findings", "defects",
                         "negatives", "mixture", "text", "kind", "diameter_mm", "location", "count", "weight",
                         "generator", "options", "splits", "train", "val", "test", "qc", "watermark", "shard_size",
                         "slice_level", "schedule", "material", "color", "source", "sampels"]) | st.text(max_size=12)
JSON_VALUES = st.recursive(_SCALARS, lambda kids: st.lists(kids, max_size=5) | st.dictionaries(_KEYS, kids, max_size=6),
                           max_leaves=25)

_BASE_CT = {"name": "fuzz", "samples": 4, "seed": 1, "image": {"size": 128, "spacing_mm": 0.7},
            "findings": {"negatives": 0.25, "mixture": ["8mm solid nodule, right upper lobe"]}}


def _dump(doc: Any) -> str:
    return json.dumps(doc, allow_nan=True, default=str)


@st.composite
def spec_documents(draw) -> str:
    """Spec text: mutated valid specs, random documents, and raw YAML-ish text."""
    choice = draw(st.integers(0, 3))
    if choice == 0:  # a valid spec with one field replaced or added
        doc = json.loads(json.dumps(_BASE_CT))
        key = draw(_KEYS)
        target = draw(st.sampled_from([doc, doc["image"], doc["findings"]]))
        target[key] = draw(JSON_VALUES)
        return _dump(doc)
    if choice == 1:
        return _dump(draw(st.dictionaries(_KEYS, JSON_VALUES, max_size=8)))
    if choice == 2:  # YAML with a random shorthand mixture entry
        text = draw(st.one_of(CT_TEXT, SURFACE_TEXT))
        return (f"name: fuzz\nsamples: 3\nfindings:\n  mixture:\n    - {json.dumps(text)}\n")
    return draw(st.text(alphabet=string.printable + "äé€\x00", max_size=300))


# Hostile documents a fuzzer rarely finds on its own. Each is a valid spec but for the one hostile part, so a
# refusal is about that part (the tests check the words of the refusal).
_FINDINGS = "findings: {mixture: ['8mm solid nodule, right upper lobe']}\n"
_OK = "samples: 5\n" + _FINDINGS


def hostile_specs() -> dict[str, tuple[str, str]]:
    """name -> (spec text, a word the refusal must contain; '' = must be accepted)."""
    laughs = "x0: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n"
    for i, name in enumerate("bcdefghij"):
        prev = "abcdefghij"[i]
        laughs += f"x{i + 1}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
    return {
        "yaml alias bomb": (laughs + "name: bomb\n" + _OK, "expands"),
        "deeply nested lists": ("name: deep\n" + _OK + "description: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
        "deeply nested mappings": ("name: deep\n" + _OK + "image: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n",
                                   "nested"),
        "moderately nested (40 levels)": ("name: deep\n" + _OK + "description: " + "[" * 40 + "]" * 40 + "\n",
                                          "nested"),
        "huge integer": ("name: big\n" + _OK + "seed: " + "9" * 5000 + "\n", "digits"),
        "huge float": ("name: big\n" + _OK + "image: {size: 128, spacing_mm: 1e400}\n", "spacing"),
        "nan spacing": ("name: nan\n" + _OK + "image: {size: 128, spacing_mm: .nan}\n", "spacing"),
        "inf seed": ("name: inf\n" + _OK + "seed: .inf\n", "seed"),
        "negative seed": ("name: neg\n" + _OK + "seed: -5\n", "seed"),
        "name with ../": ("name: ../../etc\n" + _OK, "name"),
        "absolute name": ("name: /etc/passwd\n" + _OK, "name"),
        "NUL byte escaped in name": ("name: \"a\\0b\"\n" + _OK, "name"),
        "NUL byte raw": ("name: a\x00b\n" + _OK, "NUL"),
        "unicode confusable domain": ("name: u\ndomain: сhest_ct\n" + _OK, "domain"),  # Cyrillic 'с'
        "unicode confusable kind": ("name: u\nsamples: 5\nfindings: {mixture: ['8mm ѕolid nodule, RUL']}\n", "ѕolid"),
        "fullwidth name": ("name: ｃｔ\n" + _OK, "name"),
        "ten billion samples": ("name: many\nsamples: 10000000000\n" + _FINDINGS, "samples"),
        "huge image": ("name: big\nimage: {size: 1000000}\n" + _OK, "size"),
        "huge count": ("name: big\nsamples: 5\nfindings: {mixture: [{text: '8mm solid nodule, RUL', count: 100000}]}\n",
                       "count"),
        "binary garbage": ("\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "NUL"),
        "only a list": ("- 1\n- 2\n", "mapping"),
        "tab indentation": ("name: t\n" + _OK + "image:\n\tsize: 128\n", "YAML"),
        "duplicate keys": ("name: a\nname: b\n" + _OK, "twice"),
        "python object tag": ("name: !!python/object/apply:os.system ['echo pwned']\n" + _OK, "tag"),
        "merge key": ("base: &b {size: 128}\nname: m\n" + _OK + "image: {<<: *b, spacing_mm: 0.7}\n", "base"),
        "ten million characters": ("name: long\n" + _OK + "description: '" + "x" * 10_000_000 + "'\n",
                                   "characters"),
        "a plain valid spec": ("name: ok\n" + _OK, ""),
    }


def ensure_tmp_cwd() -> Path:
    d = Path(tempfile.mkdtemp(prefix="pairforge-fuzz-"))
    os.chdir(d)
    return d


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
