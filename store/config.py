"""Where the dataset root comes from when none is given: one order, used by every command and ``DatasetStore()``.

1. ``--root`` / ``DatasetStore(root)``;
2. the ``PAIRFORGE_ROOT`` environment variable;
3. ``root = "..."`` in the nearest ``pairforge.toml`` (or ``.pairforge.toml``) in the current folder or above it
   (a relative path is relative to that file's folder);
4. ``root = "..."`` in the user config, ``$XDG_CONFIG_HOME/pairforge/config.toml`` (``~/.config/pairforge/...``);
5. the user's data folder, ``$XDG_DATA_HOME/pairforge/datasets`` (``~/.local/share/pairforge/datasets``).

The same datasets are found from any folder unless a project's ``pairforge.toml`` says otherwise.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from store.errors import StoreError

ENV = "PAIRFORGE_ROOT"
PROJECT_FILES = ("pairforge.toml", ".pairforge.toml")
HOW_TO_CHANGE = ("change it with --root, the PAIRFORGE_ROOT variable, a pairforge.toml (root = \"...\") in this "
                 "folder or above, or `pairforge root --set PATH` (see `pairforge root`)")


@dataclass(frozen=True)
class RootChoice:
    url: str
    source: str  # "--root", "PAIRFORGE_ROOT", "/path/pairforge.toml", "user config /path", "default"


def user_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "pairforge" / "config.toml"


def default_root() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "pairforge", "datasets")


def _read_root(path: Path) -> str | None:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None
    except tomllib.TOMLDecodeError as e:
        raise StoreError(f"{path} is not valid TOML ({e}); it should hold a line like: root = \"/data/pairforge\"") \
            from None
    value = data.get("root")
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise StoreError(f"{path}: root must be a folder or fsspec URL in quotes, e.g. root = \"datasets\"; "
                         f"got {value!r}")
    value = os.path.expanduser(value.strip())
    if "://" in value or os.path.isabs(value):
        return value
    return str((path.parent / value).resolve())


def project_config(start: str | os.PathLike | None = None) -> Path | None:
    """The nearest pairforge.toml (or .pairforge.toml) that sets a root, from ``start`` (the cwd) upward."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        for name in PROJECT_FILES:
            p = folder / name
            if p.is_file() and _read_root(p) is not None:
                return p
    return None


def choose_root(root: str | os.PathLike | None = None) -> RootChoice:
    """The root to use and where that choice came from (for messages)."""
    if root is not None:
        return RootChoice(os.fspath(root), "--root")
    env = os.environ.get(ENV)
    if env and env.strip():
        return RootChoice(env.strip(), ENV)
    p = project_config()
    if p is not None:
        return RootChoice(_read_root(p), str(p))  # type: ignore[arg-type]
    u = user_config_path()
    if u.is_file():
        value = _read_root(u)
        if value is not None:
            return RootChoice(value, f"user config {u}")
    return RootChoice(default_root(), "default")


STORAGE_ENV = "PAIRFORGE_STORAGE_OPTIONS"


def _read_storage_options(path: Path) -> dict | None:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    value = data.get("storage_options")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise StoreError(f"{path}: storage_options must be a table, e.g. [storage_options] with key = \"...\" and "
                         f"[storage_options.client_kwargs] endpoint_url = \"http://host:9000\"; got {value!r}")
    return value


def configured_storage_options() -> dict | None:
    """fsspec options for an object-store root when the caller gave none: ``$PAIRFORGE_STORAGE_OPTIONS`` (JSON), else
    the ``[storage_options]`` table of the nearest pairforge.toml, else of the user config. None if none is set."""
    import json

    env = os.environ.get(STORAGE_ENV)
    if env and env.strip():
        try:
            value = json.loads(env)
        except ValueError as e:
            raise StoreError(f"${STORAGE_ENV} is not JSON ({e}); write e.g. "
                             '{"client_kwargs": {"endpoint_url": "http://host:9000"}, "key": "...", "secret": "..."}') \
                from None
        if not isinstance(value, dict):
            raise StoreError(f"${STORAGE_ENV} must be a JSON object of fsspec options, not {type(value).__name__}")
        return value
    here = Path(os.getcwd()).resolve()
    for folder in (here, *here.parents):
        for name in PROJECT_FILES:
            p = folder / name
            if p.is_file():
                found = _read_storage_options(p)
                if found is not None:
                    return found
    u = user_config_path()
    return _read_storage_options(u) if u.is_file() else None


def set_user_root(value: str) -> Path:
    """Write ``root = value`` to the user config (other keys kept); returns the file."""
    path = user_config_path()
    if "://" not in value:
        value = str(Path(value).expanduser().resolve())
    lines = []
    if path.is_file():
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if not ln.strip().startswith("root")]
    lines.insert(0, f"root = {_toml_string(value)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def source_words(source: str) -> str:
    """Where a root came from, as words: 'given with --root', 'set by $PAIRFORGE_ROOT', 'set in FILE', 'the default'."""
    if source == "--root":
        return "given with --root"
    if source == ENV:
        return "set by $PAIRFORGE_ROOT"
    if source == "default":
        return "the default root"
    return f"set in {source.removeprefix('user config ')}"


def describe(choice: RootChoice) -> str:
    where = {"--root": "given with --root", ENV: "from $PAIRFORGE_ROOT", "default": "the default"}.get(
        choice.source, f"from {choice.source}")
    return f"dataset root {choice.url} ({where})"
