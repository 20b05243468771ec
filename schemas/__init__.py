"""pairforge schemas: specs, findings, class tables, the sample record, seeding rules and the domain registry.

This package imports nothing else of the project; every other package may import it.
"""
from schemas.errors import SpecError
from schemas.classes import ClassTable
from schemas.domain import Domain, get_domain, known_domains, register_domain
from schemas.sample import Sample

__all__ = ["SpecError", "CT_CLASSES", "ClassTable", "Sample", "Domain", "get_domain", "known_domains",
           "register_domain"]


def __getattr__(name: str):
    """Domain tables (e.g. ``CT_CLASSES``) from the registry, so that this package imports no domain eagerly."""
    if name.startswith("__"):
        raise AttributeError(name)
    from schemas import classes

    return getattr(classes, name)
