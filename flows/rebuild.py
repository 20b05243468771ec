"""Is a build needed? A published version with the same spec hash and code version already holds exactly what a build
would make (only its watermark's version number would differ), so rebuilding it makes no new version unless asked.
Otherwise: what changed since the latest version. No Prefect here: ``pairforge build`` answers before starting it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from schemas.spec import BaseSpec, normalised_spec

_NOT_DATA = ("schedule", "description")  # fields that change no byte (as in spec_hash)


@dataclass
class RebuildCheck:
    name: str
    up_to_date: int | None = None  # the published version that matches, if any
    latest: int | None = None
    changes: list[str] = field(default_factory=list)  # what differs from the latest version

    @property
    def ref(self) -> str | None:
        return None if self.up_to_date is None else f"{self.name}@v{self.up_to_date}"

    def summary(self) -> str:
        """One line for the build's output."""
        if self.up_to_date is not None:
            note = "" if self.up_to_date == self.latest else f" (the latest is v{self.latest})"
            return f"up to date: {self.ref}{note}"
        if self.latest is None:
            return f"first version of {self.name}"
        return f"changed since {self.name}@v{self.latest}: {'; '.join(self.changes) or 'unknown'}"


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


def spec_changes(old: dict, new: dict, limit: int = 4) -> list[str]:
    """``path: old -> new`` for each field that differs (lists compared whole), at most ``limit`` and a count."""
    a = {k: v for k, v in _flat(old).items() if k.split(".")[0] not in _NOT_DATA}
    b = {k: v for k, v in _flat(new).items() if k.split(".")[0] not in _NOT_DATA}
    diffs = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<unset>") != b.get(k, "<unset>"):
            diffs.append(f"{k}: {_short(a.get(k, '<unset>'))} -> {_short(b.get(k, '<unset>'))}")
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"and {len(diffs) - limit} more fields"]
    return diffs


def check(store: Any, spec: BaseSpec, digest: str, code_version: str) -> RebuildCheck:
    """Compare ``spec`` (its hash ``digest``) and ``code_version`` with the published versions under ``store``."""
    res = RebuildCheck(spec.name)
    try:
        versions = store.versions(spec.name)
    except Exception:  # an unreadable root is reported by the build itself, with its own message
        return res
    if not versions:
        return res
    res.latest = versions[-1]
    latest_manifest = None
    for v in reversed(versions):
        m = store.manifest(spec.name, v)
        if latest_manifest is None:
            latest_manifest = m
        if m.spec_hash == digest and m.code.code_version == code_version:
            res.up_to_date = v
            return res
    m = latest_manifest
    if m.spec_hash != digest:
        res.changes += spec_changes(m.spec, normalised_spec(spec)) or ["the spec's hash (no field differs by value)"]
    if m.code.code_version != code_version:
        res.changes.append(f"code {m.code.code_version} -> {code_version}")
    return res
