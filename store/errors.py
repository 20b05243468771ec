"""Errors of the dataset store. All are SpecError subclasses: one readable line naming what is wrong and what
is accepted (bad roots, names, refs, missing versions, corrupted files)."""
from __future__ import annotations

from schemas.errors import SpecError


class StoreError(SpecError):
    """Bad store input: an unusable root, a bad dataset name or ref, a version that does not exist."""


class IntegrityError(StoreError):
    """A stored file does not match its recorded sha256 (or is missing). ``paths`` names the files."""

    def __init__(self, message: str, paths: list[str] | None = None):
        super().__init__(message)
        self.paths = list(paths or [])


class PublishError(StoreError):
    """A build cannot be published (shards missing, version already taken)."""


class NoSpaceError(StoreError):
    """The root's disk (or quota) is full: not retried; the build stops with one line and resumes when rerun."""
