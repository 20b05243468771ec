"""pairforge schemas: specs, findings, class tables, the sample record and seeding rules.

This package imports nothing else of the project; every other package may import it.
"""
from schemas.errors import SpecError
from schemas.classes import CT_CLASSES, ClassTable
from schemas.sample import Sample

__all__ = ["SpecError", "CT_CLASSES", "ClassTable", "Sample"]
