"""Shorthand text for surface defects: "2mm scratch top-left on brushed aluminium", "3 pits 0.5-1 mm, cast iron",
"crack 40 mm, painted steel, bottom edge", "scratch 20 mm long 0.3 mm wide, horizontal".

Same standard as the CT parser: no guessing; unknown words, contradictions and ambiguities are SpecErrors that
name the offending words and list what is accepted. A bare size means length for scratch/crack/chipped edge and
equivalent diameter for dent/pit/stain/hole/particle; qualify it with long/wide/deep/diameter to say otherwise.
"""
from __future__ import annotations

import re

from pydantic import ValidationError

from schemas.errors import SpecError
from schemas.units import ACCEPTED_UNITS, UNITS_TO_MM
from schemas.wording import collect as collect_words
from schemas.wording import one_of

ACCEPTED_KINDS = ("scratch, crack, dent, pit, stain, hole, particle (contamination, debris), "
                  "missing material (chipped edge, chip)")
ACCEPTED_MATERIALS = ("brushed metal/aluminium/steel, cast iron/aluminium/metal, painted steel/metal/surface, "
                      "(injection-moulded) plastic, wood, woven textile/fabric, photo/image")
ACCEPTED_LOCATIONS = ("top-left, top-right, bottom-left, bottom-right, center, top/bottom/left/right edge, anywhere, "
                      "at (x, y) mm")

_NUM = r"(?:\d+(?:\.\d+)?|\.\d+)"
_FILLER = {"on", "in", "at", "the", "a", "an", "of", "with", "near", "surface", "part", "region", "corner", "side",
           "and", "one", "single", "defect", "defects", "area", "-", "x", "along", "from", "to", "located",
           "quadrant", "quarter"}
_WORD_NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}

_KIND_WORDS = [
    (re.compile(r"\bmissing\s+material\b|\bchipped\s+edges?\b|\bchipping\b|\bchips?\b|\bbroken\s+edges?\b|\bchipped\b"),
     "missing_material"),
    (re.compile(r"\bscratch(?:es|ed)?\b|\bscuffs?\b"), "scratch"),
    (re.compile(r"\bcrack(?:s|ed)?\b|\bfractures?\b"), "crack"),
    (re.compile(r"\bdent(?:s|ed)?\b|\bdings?\b"), "dent"),
    (re.compile(r"\bpit(?:s|ting|ted)?\b|\bpinholes?\b"), "pit"),
    (re.compile(r"\b(?:oil\s+|water\s+|rust\s+)?stain(?:s|ed)?\b|\bdiscolou?ration\b|\bsmudges?\b"), "stain"),
    (re.compile(r"\bholes?\b|\bperforations?\b"), "hole"),
    (re.compile(r"\bparticles?\b|\bcontamination\b|\bdebris\b|\binclusions?\b|\bdust\b"), "particle"),
]
_MATERIAL_WORDS = [
    (re.compile(r"\bbrushed(?:\s+(?:stainless\s+steel|aluminium|aluminum|steel|metal|stainless))?\b"), "brushed_metal"),
    (re.compile(r"\bcast(?:\s+(?:iron|aluminium|aluminum|steel|metal))\b|\bcastings?\b"), "cast_metal"),
    (re.compile(r"\bpainted(?:\s+(?:steel|metal|aluminium|aluminum|surface|panel|part))?\b|\bpaint(?:work)?\b"),
     "painted"),
    (re.compile(r"\b(?:injection[\s-]?mou?lded\s+)?plastics?\b|\bmou?lded\s+plastic\b|\babs\b|\bpolypropylene\b"),
     "plastic"),
    (re.compile(r"\bwood(?:en)?\b|\boak\b|\bpine\b|\bplywood\b|\btimber\b"), "wood"),
    (re.compile(r"\b(?:woven\s+)?(?:textile|fabric|cloth)s?\b|\bwoven\b"), "textile"),
    (re.compile(r"\bphotos?\b|\bphotographs?\b|\bimages?\b"), "image"),
]
_BAD_MATERIALS = re.compile(r"\b(?:aluminium|aluminum|steel|metal|iron|stainless)\b")
_LOCATION_WORDS = [
    (re.compile(r"\b(?:top|upper)[\s-]+left\b"), "top_left"),
    (re.compile(r"\b(?:top|upper)[\s-]+right\b"), "top_right"),
    (re.compile(r"\b(?:bottom|lower)[\s-]+left\b"), "bottom_left"),
    (re.compile(r"\b(?:bottom|lower)[\s-]+right\b"), "bottom_right"),
    (re.compile(r"\b(?:top|upper)\s+edge\b"), "top_edge"),
    (re.compile(r"\b(?:bottom|lower)\s+edge\b"), "bottom_edge"),
    (re.compile(r"\bleft\s+edge\b"), "left_edge"),
    (re.compile(r"\bright\s+edge\b"), "right_edge"),
    (re.compile(r"\bcent(?:er|re)(?:d)?\b|\bmiddle\b"), "center"),
    (re.compile(r"\banywhere\b|\bany\s+location\b|\bany\s+region\b"), "any"),
]
_BAD_LOCATION = re.compile(r"\b(?:top|bottom|upper|lower|left|right|edge)\b")
_POINT = re.compile(rf"\bat\s*\(?\s*x?\s*=?\s*({_NUM})\s*(?:mm)?\s*[,;]?\s*y?\s*=?\s*({_NUM})\s*\)?\s*mm\b")
_ORIENT_WORDS = [
    (re.compile(r"\bhorizontal(?:ly)?\b"), 0.0),
    (re.compile(r"\bvertical(?:ly)?\b"), 90.0),
    (re.compile(r"\bdiagonal(?:ly)?\b"), 45.0),
]
_ANGLE = re.compile(rf"(?:\bat\s+)?({_NUM})\s*(?:°|deg\b|degrees?\b)")
_SIZE = re.compile(rf"(?<![\w.])({_NUM})\s*(?:(?:-|to)\s*({_NUM})\s*)?([a-zµ]+)?(?![\w.])")
_QUALIFIERS = {"long": "length_mm", "length": "length_mm", "wide": "width_mm", "width": "width_mm",
               "deep": "depth_mm", "depth": "depth_mm", "diameter": "diameter_mm", "dia": "diameter_mm",
               "across": "diameter_mm", "ø": "diameter_mm"}
_LINEAR = ("scratch", "crack", "missing_material")


def parse_defect_text(text: str):
    """Parse one shorthand defect -> (SurfaceDefect, material or None). SpecError on anything unclear."""
    from schemas.surface_findings import SurfaceDefect

    if text is None or not str(text).strip():
        raise SpecError("empty defect text; write e.g. '2mm scratch top-left on brushed aluminium'")
    original = str(text).strip()
    t = " " + original.lower().replace("–", "-").replace("—", "-").replace(",", " , ").replace(";", " ") + " "
    t = t.replace("×", " x ")

    point = None
    m = _POINT.search(t)
    if m:
        point = {"x_mm": float(m.group(1)), "y_mm": float(m.group(2))}
        t = t[:m.start()] + " " + t[m.end():]

    def collect(table):
        nonlocal t
        hits, t = collect_words(t, table)
        return hits

    def single(hits, what, accepted):
        return one_of(hits, what, accepted, original)

    kind = single(collect(_KIND_WORDS), "defect kinds", ACCEPTED_KINDS)
    locs = collect(_LOCATION_WORDS)
    if point is not None:
        locs.append(("at (x, y) mm", "point"))
    location = single(locs, "locations", ACCEPTED_LOCATIONS)
    bad = _BAD_LOCATION.search(t)
    if bad:
        raise SpecError(f"location word {bad.group(0)!r} in {original!r} is incomplete; accepted locations: "
                        f"{ACCEPTED_LOCATIONS}")
    material = single(collect(_MATERIAL_WORDS), "materials", ACCEPTED_MATERIALS)
    bad = _BAD_MATERIALS.search(t)
    if bad:
        raise SpecError(f"material {bad.group(0)!r} in {original!r} does not say the finish; accepted materials: "
                        f"{ACCEPTED_MATERIALS}")
    angles = [(mm.group(0).strip(), float(mm.group(1))) for mm in _ANGLE.finditer(t)]
    t = _ANGLE.sub(" ", t)
    orient = single(angles + collect(_ORIENT_WORDS), "orientations", "horizontal, vertical, diagonal, or N°")
    if kind is None:
        raise SpecError(f"no defect kind in {original!r}; accepted kinds: {ACCEPTED_KINDS}")

    neg = re.search(r"(?:^|[^\d.\s])\s*(-\s*\d[\w.]*)", t)
    if neg:
        raise SpecError(f"size {neg.group(1)!r} in {original!r} is not positive; a size is a positive length, e.g. 2mm")
    # "20 x 0.3 mm": length x width
    lw = re.search(rf"(?<![\w.])({_NUM})\s*(mm|cm)?\s+x\s+({_NUM})\s*(mm|cm)\b", t)
    sizes: dict[str, tuple[float, float]] = {}
    if lw:
        unit_l = UNITS_TO_MM[lw.group(2) or lw.group(4)]
        unit_w = UNITS_TO_MM[lw.group(4)]
        sizes["length_mm"] = (float(lw.group(1)) * unit_l,) * 2
        sizes["width_mm"] = (float(lw.group(3)) * unit_w,) * 2
        t = t[:lw.start()] + " " + t[lw.end():]
    count = None
    pos = 0
    while True:
        m = _SIZE.search(t, pos)
        if m is None:
            break
        lo, hi, unit = m.group(1), m.group(2), m.group(3)
        if unit is None or unit in _FILLER or unit in _QUALIFIERS:
            if hi is None and re.fullmatch(r"\d+", lo) and count is None and not sizes:
                count = int(lo)
                t = t[:m.start(1)] + " " * len(lo) + t[m.end(1):]
                pos = m.end(1)
                continue
            raise SpecError(f"size {m.group(0).strip()!r} in {original!r} has no unit; accepted units: "
                            f"{ACCEPTED_UNITS}")
        if unit not in UNITS_TO_MM:
            raise SpecError(f"unknown unit {unit!r} in {m.group(0).strip()!r} of {original!r}; accepted units: "
                            f"{ACCEPTED_UNITS}")
        f = UNITS_TO_MM[unit]
        value = (float(lo) * f, float(hi) * f if hi else float(lo) * f)
        # The qualifier is the word right after the size ("20 mm long") or right before it ("width 0.3 mm").
        after = re.match(r"\s*([a-zø]+)", t[m.end():])
        before = re.search(r"([a-zø]+)\s*:?\s*$", t[:m.start()])
        field = None
        span = (m.start(), m.end())
        if after and after.group(1) in _QUALIFIERS:
            field = _QUALIFIERS[after.group(1)]
            span = (m.start(), m.end() + after.end())
        elif before and before.group(1) in _QUALIFIERS and before.group(1) not in ("long", "wide", "deep"):
            field = _QUALIFIERS[before.group(1)]
            span = (before.start(), m.end())
        if field is None:
            field = "length_mm" if kind in _LINEAR else "diameter_mm"
        if field in sizes:
            raise SpecError(f"several {field.removesuffix('_mm')}s in {original!r}; give one value or one range each")
        if value[0] > value[1]:
            raise SpecError(f"size range {m.group(0).strip()!r} in {original!r} has min above max")
        sizes[field] = value
        t = t[:span[0]] + " " * (span[1] - span[0]) + t[span[1]:]
        pos = span[1]

    words = t.replace(",", " ").split()
    for w in list(words):
        if w in _WORD_NUMBERS and count is None:
            count = _WORD_NUMBERS[w]
            words.remove(w)
    if not sizes:
        main = "a length" if kind in _LINEAR else "a diameter"
        raise SpecError(f"no size in {original!r}; a {kind} needs {main} with a unit, e.g. '2mm' or '0.5-1 mm' "
                        f"({ACCEPTED_UNITS})")
    unknown = [w for w in words if w not in _FILLER]
    if unknown:
        raise SpecError(f"unrecognised words {' '.join(repr(w) for w in unknown)} in {original!r}; a defect is "
                        f"[count] KIND SIZE [long/wide/deep], [LOCATION], [MATERIAL] with kinds {ACCEPTED_KINDS}; "
                        f"locations {ACCEPTED_LOCATIONS}; materials {ACCEPTED_MATERIALS}")
    data = {"kind": kind, "count": count or 1, **sizes}
    if location is not None:
        data["location"] = point if location == "point" else location
    if orient is not None:
        data["orientation_deg"] = (orient, orient)
    try:
        return SurfaceDefect(**data), material
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        loc = ".".join(str(x) for x in err["loc"])
        raise SpecError(f"{loc + ': ' if loc else ''}{msg} in {original!r}") from None
