"""Where the dataset root comes from when none is given: one order, used by every command and ``DatasetStore()``.

1. ``--root`` / ``DatasetStore(root)``;
2. the ``PAIRFORGE_ROOT`` environment variable;
3. ``root = "..."`` in the nearest ``pairforge.toml`` (or ``.pairforge.toml``) in the current folder or above it
   (a relative path is relative to that file's folder);
4. ``root = "..."`` in the user config, ``$XDG_CONFIG_HOME/pairforge/config.toml`` (``~/.config/pairforge/...``);
5. the user's data folder, ``$XDG_DATA_HOME/pairforge/datasets`` (``~/.local/share/pairforge/datasets``).

The same datasets are found from any folder unless a project's ``pairforge.toml`` says otherwise.

Storage options for remote roots (endpoint, keys, region: whatever fsspec's filesystem takes) come from a
``[storage."<protocol or URL prefix>"]`` table in the same files (``storage_options_for``), e.g.::

    root = "s3://my-bucket/datasets"
    [storage.s3]                                   # every s3:// root and pull destination
    client_kwargs = {endpoint_url = "http://127.0.0.1:9000"}
    [storage."s3://other-bucket"]                  # a longer URL prefix wins
    anon = true

or from ``$PAIRFORGE_STORAGE_OPTIONS`` (the same tables as JSON, ``{"s3": {...}}``), which comes first.
"""
from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from store.errors import StoreError

ENV = "PAIRFORGE_ROOT"
STORAGE_ENV = "PAIRFORGE_STORAGE_OPTIONS"
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


def set_user_root(value: str) -> Path:
    """Write ``root = value`` to the user config (other keys kept); returns the file."""
    path = user_config_path()
    if "://" not in value:
        value = str(Path(os.path.expanduser(value)).resolve())
    lines = []
    if path.is_file():
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if not ln.strip().startswith("root")]
    lines.insert(0, f"root = {_toml_string(value)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _storage_tables(path: Path) -> dict | None:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None
    except tomllib.TOMLDecodeError as e:
        raise StoreError(f"{path} is not valid TOML ({e})") from None
    tables = data.get("storage")
    if tables is None:
        return None
    if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
        raise StoreError(f"{path}: [storage] must hold tables named by protocol or URL prefix, e.g. [storage.s3] "
                         "with client_kwargs = {endpoint_url = \"...\"}")
    return tables


def _pick(tables: dict, url: str) -> dict | None:
    proto = url.split("://", 1)[0]
    prefixes = [k for k in tables if "://" in k and url.rstrip("/").startswith(k.rstrip("/"))]
    if prefixes:
        return dict(tables[max(prefixes, key=len)])
    if proto in tables:
        return dict(tables[proto])
    return None


def _keyed(tables: dict) -> bool:
    """True when a JSON/TOML table holds option tables keyed by protocol or URL prefix ({"s3": {...}}), False when it
    is itself one flat set of fsspec options ({"key": ..., "client_kwargs": {...}})."""
    from fsspec.registry import known_implementations

    return bool(tables) and all(isinstance(v, dict) and ("://" in k or k in known_implementations)
                                for k, v in tables.items())


def storage_options_for(url: str) -> dict | None:
    """fsspec storage options for a remote ``url``: $PAIRFORGE_STORAGE_OPTIONS (JSON), then the nearest
    pairforge.toml, then the user config. Each may key option tables by protocol or URL prefix (``[storage.s3]``,
    ``[storage."s3://bucket/prefix"]``, ``{"s3": {...}}``; the longest matching prefix wins, else the protocol) or
    give one flat set for every remote root (``[storage_options]``, ``{"key": ..., "client_kwargs": {...}}``).
    None for local paths or when nothing is configured."""
    if "://" not in url or url.startswith(("file://", "local://")):
        return None
    env = os.environ.get(STORAGE_ENV)
    if env and env.strip():
        try:
            tables = json.loads(env)
        except json.JSONDecodeError as e:
            raise StoreError(f"${STORAGE_ENV} is not valid JSON ({e.msg}); write e.g. "
                             '{"s3": {"client_kwargs": {"endpoint_url": "http://host:9000"}}}') from None
        if not isinstance(tables, dict):
            raise StoreError(f"${STORAGE_ENV} must be a JSON object: fsspec options keyed by protocol or URL prefix, "
                             'e.g. {"s3": {"client_kwargs": {"endpoint_url": "http://host:9000"}}}, '
                             f"not {type(tables).__name__}")
        if not _keyed(tables):
            return dict(tables)
        got = _pick(tables, url)
        if got is not None:
            return got
    here = Path(os.getcwd()).resolve()
    candidates = [folder / name for folder in (here, *here.parents) for name in PROJECT_FILES]
    for p in [*candidates, user_config_path()]:
        if p.is_file():
            tables = _storage_tables(p)
            got = _pick(tables, url) if tables else None
            if got is None:
                got = _read_storage_options(p)
            if got is not None:
                return got
    return None


def source_words(source: str) -> str:
    """Where a root came from, as words: 'given with --root', 'set by $PAIRFORGE_ROOT', 'set in FILE', 'the default'."""
    if source == "--root":
        return "given with --root"
    if source == ENV:
        return "set by $PAIRFORGE_ROOT"
    if source == "default":
        return "the default root"
    if source == "DEST":
        return "the destination given"
    return f"set in {source.removeprefix('user config ')}"


def describe(choice: RootChoice) -> str:
    where = {"--root": "given with --root", ENV: "from $PAIRFORGE_ROOT", "default": "the default"}.get(
        choice.source, f"from {choice.source}")
    return f"dataset root {choice.url} ({where})"
