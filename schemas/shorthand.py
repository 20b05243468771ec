"""Shorthand text for single chest-CT findings: "8mm nodule, right upper lobe", "0.8 cm GGN in the RUL".

The parser never guesses: words it does not know, contradictions and ambiguities are errors that name
the offending words and list what is accepted.
"""
from __future__ import annotations

import re

from pydantic import ValidationError

from schemas.errors import SpecError
from schemas.findings import NoduleFinding
from schemas.units import ACCEPTED_UNITS, UNITS_TO_MM
from schemas.wording import collect, one_of, take

ACCEPTED_LOBES = ("RUL/right upper lobe, RML/right middle lobe, RLL/right lower lobe, "
                  "LUL/left upper lobe (lingula), LLL/left lower lobe, any lobe")
ACCEPTED_KINDS = "solid, part-solid (PSN), ground-glass (GGN/GGO) nodule"
ACCEPTED_MARGINS = "smooth, lobulated, spiculated"

_FILLER = {"in", "the", "a", "an", "of", "at", "with", "and", "on", "located", "within", "lobe", "lobes",
           "nodule", "nodules", "lesion", "lesions", "lung", "one", "single", "pulmonary", "x"}
_WORD_NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}

_NUM = r"(?:\d+(?:\.\d+)?|\.\d+)"
_SIZE = re.compile(rf"(?<![\w.])({_NUM})\s*(?:(?:-|to)\s*({_NUM})\s*)?([a-zµ]+)?(?![\w.])")
_LOBE_WORDS = [
    (re.compile(r"\b(?:right|r)\s+upper(?:\s+lobe)?\b|\brul\b"), "RUL"),
    (re.compile(r"\b(?:right|r)\s+middle(?:\s+lobe)?\b|\brml\b"), "RML"),
    (re.compile(r"\b(?:right|r)\s+lower(?:\s+lobe)?\b|\brll\b"), "RLL"),
    (re.compile(r"\b(?:left|l)\s+upper(?:\s+lobe)?\b|\blul\b|\blingula(?:r)?(?:\s+segment)?\b"), "LUL"),
    (re.compile(r"\b(?:left|l)\s+lower(?:\s+lobe)?\b|\blll\b"), "LLL"),
    (re.compile(r"\bmiddle\s+lobe\b"), "RML"),  # only the right lung has one
    (re.compile(r"\bany\s+lobe\b|\banywhere\b|\bany\s+location\b"), "any"),
]
_BAD_LOBES = [
    (re.compile(r"\b(?:left|l)\s+middle(?:\s+lobe)?\b|\blml\b"), "there is no left middle lobe (the left lung has two lobes)"),
    (re.compile(r"\bupper\s+lobe\b"), "'upper lobe' is ambiguous: say right or left (RUL or LUL)"),
    (re.compile(r"\blower\s+lobe\b"), "'lower lobe' is ambiguous: say right or left (RLL or LLL)"),
    (re.compile(r"\b(?:right|left)\s+lung\b"), "a whole lung is not a lobe: name one lobe"),
]
_KIND_WORDS = [
    (re.compile(r"\bpart[\s-]?solid\b|\bpsn\b|\bsemi[\s-]?solid\b"), "part_solid"),
    (re.compile(r"\b(?:pure\s+)?ground[\s-]?glass(?:\s+opacity)?\b|\bggn\b|\bggo\b|\bnon[\s-]?solid\b"), "ground_glass"),
    (re.compile(r"\bsolid\b"), "solid"),
]
_MARGIN_WORDS = [
    (re.compile(r"\bspiculated\b|\bspiculation\b"), "spiculated"),
    (re.compile(r"\blobulated\b|\blobular\b"), "lobulated"),
    (re.compile(r"\bsmooth\b|\bwell[\s-]defined\b|\bround(?:ed)?\b|\bcircumscribed\b"), "smooth"),
]
_JUXTA = re.compile(r"\bjuxta[\s-]?pleural\b|\bpleural[\s-]based\b|\bsubpleural\b")


def parse_finding(text: str) -> NoduleFinding:
    """Parse one shorthand finding; raise SpecError naming the offending words on anything unclear."""
    if text is None or not str(text).strip():
        raise SpecError("empty finding text; write e.g. '8mm solid nodule, right upper lobe'")
    original = str(text).strip()
    t = " " + original.lower().replace("–", "-").replace("—", "-").replace(",", " ").replace(";", " ") + " "

    # No left middle lobe: checked first, before "middle lobe" could be read as RML.
    pat, why = _BAD_LOBES[0]
    if pat.search(t):
        raise SpecError(f"{why} in {original!r}; accepted lobes: {ACCEPTED_LOBES}")

    lobes, t = collect(t, _LOBE_WORDS)
    for pat, why in _BAD_LOBES[1:]:  # ambiguous phrases left after the exact lobe names were taken out
        if pat.search(t):
            raise SpecError(f"{why} in {original!r}; accepted lobes: {ACCEPTED_LOBES}")
    kinds, t = collect(t, _KIND_WORDS)
    margins, t = collect(t, _MARGIN_WORDS)
    juxta, t = take(t, _JUXTA)

    location = one_of(lobes, "locations", ACCEPTED_LOBES, original) or "any"
    kind = one_of(kinds, "kinds", ACCEPTED_KINDS, original) or "solid"
    margin = one_of(margins, "margins", ACCEPTED_MARGINS, original) or "smooth"

    neg = re.search(r"(?:^|[^\d.\s])\s*(-\s*\d[\w.]*)", t)
    if neg:
        raise SpecError(f"size {neg.group(1)!r} in {original!r} is not positive; a diameter is a positive length, e.g. 8mm")
    sizes = []
    count = None
    for m in list(_SIZE.finditer(t)):
        lo, hi, unit = m.group(1), m.group(2), m.group(3)
        if unit is None or unit in _FILLER or unit in {"solid", "part", "ground", "x"}:
            # A bare number: a count when it is a whole number before the finding words, else a size without unit.
            if hi is None and re.fullmatch(r"\d+", lo) and count is None and not sizes:
                count = int(lo)
                t = t.replace(m.group(0), " " + (unit or "") + " ", 1)
                continue
            raise SpecError(f"size {m.group(0).strip()!r} in {original!r} has no unit; accepted units: {ACCEPTED_UNITS}")
        if unit not in UNITS_TO_MM:
            raise SpecError(f"unknown unit {unit!r} in {m.group(0).strip()!r} of {original!r}; accepted units: {ACCEPTED_UNITS}")
        f = UNITS_TO_MM[unit]
        sizes.append((m.group(0).strip(), (float(lo) * f, float(hi) * f if hi else float(lo) * f)))
        t = t.replace(m.group(0), " ", 1)

    words = t.split()
    for w in list(words):
        if w in _WORD_NUMBERS and count is None:
            count = _WORD_NUMBERS[w]
            words.remove(w)
    if not sizes:
        raise SpecError(f"no size in {original!r}; write a diameter with a unit, e.g. '8mm' or '4-6 mm' ({ACCEPTED_UNITS})")
    if len(sizes) > 1:
        raise SpecError(f"several sizes {' and '.join(repr(s) for s, _ in sizes)} in {original!r}; give one diameter or one range")
    unknown = [w for w in words if w not in _FILLER and w != "-"]
    if unknown:
        raise SpecError(f"unrecognised words {' '.join(repr(w) for w in unknown)} in {original!r}; a finding is "
                        f"[count] [margin] [kind] nodule SIZE, LOBE with kinds {ACCEPTED_KINDS}; margins "
                        f"{ACCEPTED_MARGINS}; lobes {ACCEPTED_LOBES}")
    lo, hi = sizes[0][1]
    if lo > hi:
        raise SpecError(f"size range {sizes[0][0]!r} in {original!r} has min above max")
    try:
        return NoduleFinding(kind=kind, diameter_mm=(lo, hi), location=location, count=count or 1,
                             margin=margin, juxtapleural=bool(juxta))
    except ValidationError as e:
        raise SpecError(f"{_first_error(e)} in {original!r}") from None


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")
    loc = ".".join(str(x) for x in err["loc"])
    return f"{loc}: {msg}" if loc and loc not in msg else msg
