"""Fixed class tables (label id -> name, display colour) per domain. Ids never change once published.

Each domain's table lives in its own schema module and is registered with the domain (``schemas.domain``);
``class_table(domain)`` looks it up.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ClassTable:
    domain: str
    names: dict[int, str]
    colors: dict[int, tuple[int, int, int]] = field(default_factory=dict)

    def id(self, name: str) -> int:
        for k, v in self.names.items():
            if v == name:
                return k
        raise KeyError(f"unknown class {name!r} in the {self.domain} table; known: {', '.join(self.names.values())}")

    def as_dict(self) -> dict[str, str]:
        return {str(k): v for k, v in sorted(self.names.items())}


def class_table(domain: str) -> ClassTable:
    """The published class table of ``domain``; KeyError naming the known domains otherwise."""
    from schemas.domain import get_domain

    return get_domain(domain).classes


def __getattr__(name: str):
    """Tables that moved to their domain's module (e.g. the CT lobe ids), found through the registry."""
    if name.startswith("__"):
        raise AttributeError(name)
    import importlib

    from schemas.domain import all_domains

    for d in all_domains():
        mod = importlib.import_module(d.schema_module)
        if name in vars(mod):
            return vars(mod)[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
