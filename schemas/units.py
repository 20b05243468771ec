"""Physical quantities in specs: millimetre values or ranges, given as 8, "8mm", "0.8 cm", [4, 6] or "4-6 mm"."""
from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

from schemas.errors import SpecError

UNITS_TO_MM = {"mm": 1.0, "millimeter": 1.0, "millimeters": 1.0, "millimetre": 1.0, "millimetres": 1.0,
               "cm": 10.0, "centimeter": 10.0, "centimeters": 10.0, "centimetre": 10.0, "centimetres": 10.0}
ACCEPTED_UNITS = "mm, cm"
_NUM = r"(\d+(?:\.\d+)?|\.\d+)"
_RANGE_TEXT = re.compile(rf"^\s*{_NUM}\s*(?:(?:-|–|—|to)\s*{_NUM})?\s*([a-zA-Zµ]*)\s*$")


def parse_length_text(text: str, what: str = "size") -> tuple[float, float]:
    m = _RANGE_TEXT.match(text)
    if not m:
        raise SpecError(f"{what} {text!r} is not a length; write a number or a range with a unit, e.g. 8mm, 0.8 cm, 4-6 mm")
    lo, hi, unit = m.group(1), m.group(2), m.group(3).lower()
    unit = unit or "mm"
    if unit not in UNITS_TO_MM:
        raise SpecError(f"unknown unit {unit!r} in {what} {text!r}; accepted units: {ACCEPTED_UNITS}")
    f = UNITS_TO_MM[unit]
    a = float(lo) * f
    b = float(hi) * f if hi is not None else a
    return a, b


def to_range(value: Any, what: str = "value") -> tuple[float, float]:
    """Normalise a scalar, a 2-list, a {min,max} mapping or a text range into (lo, hi)."""
    if isinstance(value, bool):
        raise SpecError(f"{what} must be a number or a [min, max] range, not {value!r}")
    if isinstance(value, (int, float)):
        lo = hi = float(value)
    elif isinstance(value, str):
        lo, hi = parse_length_text(value, what)
    elif isinstance(value, dict) and set(value) <= {"min", "max"} and value:
        lo = float(value.get("min", value.get("max")))
        hi = float(value.get("max", value.get("min")))
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        lo, hi = float(value[0]), float(value[1])
    else:
        raise SpecError(f"{what} must be a number or a [min, max] range, not {value!r}")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise SpecError(f"{what} must be a finite number or range, not {value!r}")
    if lo > hi:
        raise SpecError(f"{what} range [{lo:g}, {hi:g}] has min above max; write [min, max]")
    return lo, hi


def _range_validator(what: str):
    def check(v: Any) -> tuple[float, float]:
        try:
            return to_range(v, what)
        except SpecError as e:
            raise ValueError(str(e)) from None
    return check


def _range_schema(unit: str) -> dict:
    return {"anyOf": [{"type": "number"}, {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
                      {"type": "string", "description": f"e.g. '4-6 {unit}'"}],
            "description": f"a value or a [min, max] range, in {unit}"}


def MmRange(what: str = "size"):
    return Annotated[tuple[float, float], BeforeValidator(_range_validator(what)), WithJsonSchema(_range_schema("mm")),
                     PlainSerializer(lambda v: [v[0], v[1]], return_type=list)]


def UnitRange(what: str):
    return Annotated[tuple[float, float], BeforeValidator(_range_validator(what)), WithJsonSchema(_range_schema("units")),
                     PlainSerializer(lambda v: [v[0], v[1]], return_type=list)]
