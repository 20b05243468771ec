"""Shared pieces of the shorthand parsers: taking known phrases out of a text, refusing contradictions, and
expanding shorthand entries of a spec's mixture."""
from __future__ import annotations

import re
from typing import Any, Callable

from schemas.errors import SpecError

WordTable = list[tuple[re.Pattern, str]]


def take(text: str, pattern: re.Pattern) -> tuple[list[str], str]:
    """The phrases ``pattern`` finds in ``text``, and the text with them blanked out."""
    return [m.group(0).strip() for m in pattern.finditer(text)], pattern.sub(" ", text)


def collect(text: str, table: WordTable) -> tuple[list[tuple[str, str]], str]:
    """(phrase, value) for every phrase of ``table`` found in ``text``, and the text with them blanked out."""
    hits: list[tuple[str, str]] = []
    for pattern, value in table:
        words, text = take(text, pattern)
        hits += [(w, value) for w in words]
    return hits, text


def one_of(hits: list[tuple[str, str]], what: str, accepted: str, original: str) -> str | None:
    """The single value the hits agree on (None if there are none); SpecError naming the words if they disagree."""
    values = {v for _, v in hits}
    if len(values) > 1:
        words = " and ".join(repr(w) for w, _ in hits)
        raise SpecError(f"contradictory {what} {words} in {original!r}; give one of: {accepted}")
    return values.pop() if values else None


def expand_mixture(items: Any, parse: Callable[[str], dict], what: str, noun: str) -> list:
    """A mixture list with shorthand entries ("text" or {"text": ..., weight: ...}) parsed into field dicts; fields
    given beside ``text`` override the parsed ones."""
    if not isinstance(items, list):
        raise ValueError(f"{what} must be a list of {noun}")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(parse(item))
        elif isinstance(item, dict) and "text" in item:
            out.append({**parse(item["text"]), **{k: w for k, w in item.items() if k != "text"}})
        else:
            out.append(item)
    return out
