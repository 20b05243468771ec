"""What a build settles before any orchestration starts: the spec (from a path, text or mapping), the dataset
root, and the code version. Nothing here imports Prefect, so ``pairforge build`` checks its input and launches the
local API server before paying for Prefect's imports, and a bare loop can use the same calls.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

import yaml

from schemas.errors import SpecError
from schemas.spec import BaseSpec, load_spec, load_spec_text, validate_spec

# Source that decides the bytes of a dataset; a change to any of it is a new code version (no resuming across).
_CODE_PACKAGES = ("schemas", "generators", "annotators", "store")
_CODE_MODULES = ("flows/pipeline.py",)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``pairforge <version>+src.<hash>``: the package version plus a digest of every source file that shapes
    the data (generators, annotators, store, schemas, the sample pipeline)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("pairforge")
    except PackageNotFoundError:
        pkg = "0+unknown"
    h = hashlib.sha256()
    repo = Path(__file__).resolve().parent.parent
    files: list[Path] = []
    for pkg_dir in _CODE_PACKAGES:
        files += sorted((repo / pkg_dir).rglob("*.py"))
    files += [repo / m for m in _CODE_MODULES]
    for f in files:
        if f.is_file() and "__pycache__" not in f.parts:
            h.update(str(f.relative_to(repo)).encode())
            h.update(f.read_bytes())
    return f"{pkg}+src.{h.hexdigest()[:12]}"


def resolve_spec(spec: Any) -> tuple[BaseSpec, str]:
    """A validated spec and its text, from a path, YAML/JSON text, a mapping or a spec model. SpecError otherwise."""
    if isinstance(spec, BaseSpec):
        return spec, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    if isinstance(spec, dict):
        return validate_spec(spec), yaml.safe_dump(spec, sort_keys=False)
    if isinstance(spec, Path) or (isinstance(spec, str) and "\n" not in spec and (
            spec.endswith((".yaml", ".yml", ".json")) or os.path.exists(spec))):
        model = load_spec(spec)
        return model, Path(spec).read_text(encoding="utf-8")
    if isinstance(spec, str):
        return load_spec_text(spec), spec
    raise SpecError(f"a spec must be a file path, YAML text or a mapping, not {type(spec).__name__}")


def check_root_writable(root: str | None) -> None:
    """Fail fast, before any orchestration, when the dataset root cannot be written (one StoreError line)."""
    from store.root import ensure_writable, resolve_root

    ensure_writable(resolve_root(root))
