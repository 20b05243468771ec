"""Exporting a published version into other tools' layouts: one registry of formats, each a function that reads the
version through the sha-verified reader (``store.read.VersionDataset``: every file checked against its sha256) and
writes into a staging folder that is renamed into place at the end, so a refused export writes nothing.

A format is one module with one registered function::

    from store.export import Option, register_exporter, selected, staged_folder

    @register_exporter("mvtec", summary="MVTec AD folder layout", options={"class_name": Option(str, "...")})
    def export_mvtec(version, dest, *, split=None, classes=None, overwrite=False, class_name=None) -> dict:
        with staged_folder(dest / (class_name or version.name), overwrite=overwrite) as out:
            for i in selected(version, split, classes):
                (out / f"{version.row(i)['sample_id']}.png").write_bytes(version.file_bytes(i, "image"))
        return {"path": str(dest / ...), "counts": {...}}

plus its module name in ``EXPORTER_MODULES`` (or, from another package, an entry point in the group
``pairforge.exporters``). ``export_version(root, "name@vN", "mvtec", dest, ...)`` and ``pairforge export FORMAT
NAME@vN DEST`` call it; they check the format, its options, the split and class names before reading anything.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from schemas.errors import SpecError
from store.read import VersionDataset, resolve_version
from store.root import Root, resolve_root

# Modules that register the built-in formats; imported on the first look-up.
EXPORTER_MODULES: tuple[str, ...] = ("store.mvtec", "store.dicom_volume", "store.nnunet", "store.coco",
                                     "store.monai_export", "store.hf", "store.croissant", "store.yolo")
ENTRY_POINT_GROUP = "pairforge.exporters"

ExportFn = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class Option:
    """A format-specific option (``--option name=value`` on the command line)."""
    type: type = str
    help: str = ""
    default: Any = None

    def parse(self, name: str, value: Any) -> Any:
        """A value from Python as is (type-checked), a string from the command line converted to ``type``."""
        if self.type is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise SpecError(f"option {name}={value!r} is not a boolean; use true or false")
        if isinstance(value, self.type):
            return value
        if isinstance(value, str):
            try:
                return self.type(value)
            except (TypeError, ValueError):
                pass
        raise SpecError(f"option {name}={value!r} is not a {self.type.__name__}")


@dataclass(frozen=True)
class ExportFormat:
    name: str
    export: ExportFn
    summary: str = ""
    options: dict[str, Option] = field(default_factory=dict)


_FORMATS: dict[str, ExportFormat] = {}
_loaded = False


def register_exporter(name: str, *, summary: str = "", options: dict[str, Option] | None = None
                      ) -> Callable[[ExportFn], ExportFn]:
    """Register ``fn(version, dest, *, split=None, classes=None, overwrite=False, **options) -> summary dict`` as
    format ``name``. ``version`` is a verified ``VersionDataset``; ``split`` and ``classes`` arrive checked (tuples
    of names, or None for all); ``dest`` is a ``Path``. The function writes through ``staged_folder``."""
    if not name or not name.replace("_", "").replace("-", "").isalnum() or name.lower() != name:
        raise ValueError(f"exporter name {name!r}: use lower-case letters, digits, '-' or '_'")

    def deco(fn: ExportFn) -> ExportFn:
        _FORMATS[name] = ExportFormat(name, fn, summary, dict(options or {}))
        return fn

    return deco


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    for module in EXPORTER_MODULES:
        importlib.import_module(module)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def formats() -> dict[str, ExportFormat]:
    """Every registered format by name."""
    _load_builtin()
    return dict(sorted(_FORMATS.items()))


def get_format(name: str) -> ExportFormat:
    known = formats()
    if name not in known:
        raise SpecError(f"unknown export format {name!r}; accepted: {', '.join(known) or 'none registered'}")
    return known[name]


def check_options(fmt: ExportFormat, opts: dict[str, Any]) -> dict[str, Any]:
    """The options parsed, defaults filled in; an unknown option is a SpecError naming the accepted ones."""
    unknown = sorted(set(opts) - set(fmt.options))
    if unknown:
        accepted = ", ".join(f"{k} ({o.type.__name__})" for k, o in fmt.options.items()) or "none"
        raise SpecError(f"export format {fmt.name!r} has no option {unknown[0]!r}; accepted: {accepted}")
    out = {k: o.default for k, o in fmt.options.items()}
    out.update({k: fmt.options[k].parse(k, v) for k, v in opts.items()})
    return out


def _names(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """``"a,b"`` / ``["a", "b,c"]`` -> ("a", "b", "c"); None or empty -> None (all)."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    names = tuple(dict.fromkeys(s.strip() for item in items for s in str(item).split(",") if s.strip()))
    return names or None


def finding_kinds(row: dict[str, Any]) -> list[str]:
    return [f["kind"] for f in (row.get("requested") or []) if f.get("kind")]


def check_selection(version: VersionDataset, split: str | Iterable[str] | None,
                    classes: str | Iterable[str] | None) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """``split`` and ``classes`` as tuples, each name checked against what the version holds."""
    splits, kinds = _names(split), _names(classes)
    if splits:
        m = version.manifest  # the spec's splits, even one too small to have drawn a sample
        there = sorted(set(m.counts.splits) | set(m.spec.get("splits") or {}))
        bad = [s for s in splits if s not in there]
        if bad:
            raise SpecError(f"split {bad[0]!r} is not in {version.ref}; splits there: {', '.join(there)}")
    if kinds:
        there = sorted({k for i in range(len(version)) for k in finding_kinds(version.row(i))})
        bad = [k for k in kinds if k not in there]
        if bad:
            raise SpecError(f"class {bad[0]!r} is not a finding kind of {version.ref}; kinds there: "
                            f"{', '.join(there) or 'none'}")
    return splits, kinds


def selected(version: VersionDataset, split: Sequence[str] | None = None,
             classes: Sequence[str] | None = None) -> list[int]:
    """Indices of the samples an export holds: those of the given splits (None: all) whose findings are all of the
    given kinds (None: any). Samples without findings (negatives) are kept whatever ``classes`` says."""
    out = []
    for i in range(len(version)):
        r = version.row(i)
        if split and r["split"] not in split:
            continue
        if classes and any(k not in classes for k in finding_kinds(r)):
            continue
        out.append(i)
    return out


def exported(version: VersionDataset, split: Sequence[str] | None = None, classes: Sequence[str] | None = None,
             include_failed: bool = False) -> list[int]:
    """``selected`` less the samples that failed QC (unless ``include_failed``); a SpecError if none is left."""
    out = [i for i in selected(version, split, classes)
           if include_failed or bool((version.row(i).get("qc") or {}).get("passed", True))]
    if not out:
        raise SpecError(f"{version.ref}: no sample is selected for export (check --split / --classes)")
    return out


@contextlib.contextmanager
def staged_folder(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty folder beside ``final`` to write into; on success it becomes ``final`` in one rename (an
    existing ``final`` is replaced only with ``overwrite``); on any error it is removed, with any parent folders
    this call created. Folders get the usual modes (0777 less the umask), as the files written into them do."""
    final = Path(os.path.abspath(os.fspath(final)))
    if os.path.lexists(final) and not overwrite:
        raise SpecError(f"{str(final)!r} already exists; pass --overwrite (overwrite=True) to replace it")
    created: list[Path] = []
    parent = final.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    tmp = final.parent / f".{final.name}.partial-{secrets.token_hex(4)}"
    try:
        try:
            for p in reversed(created):
                os.mkdir(p)
            os.mkdir(tmp)
        except OSError as e:  # a file in the way, a read-only or full disk, a name too long
            raise SpecError(f"cannot create the export folder {str(final)[:300]!r}: {e.strerror or e}") from None
        yield tmp
        old = None
        if os.path.lexists(final):
            old = final.parent / f".{final.name}.old-{secrets.token_hex(4)}"
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # deepest first; only folders this call made, and only while empty
            with contextlib.suppress(OSError):
                os.rmdir(p)
        raise


def export_version(root: Root | str | os.PathLike | None, ref: str, fmt: str, dest: str | os.PathLike, *,
                   split: str | Iterable[str] | None = None, classes: str | Iterable[str] | None = None,
                   overwrite: bool = False, storage_options: dict | None = None, **options: Any) -> dict[str, Any]:
    """Export the published version ``ref`` (``name@vN``) under ``root`` as format ``fmt`` into ``dest``. The format
    and its options are checked before the store is touched; the version is read through the verified reader."""
    form = get_format(fmt)
    opts = check_options(form, options)
    r = root if isinstance(root, Root) else resolve_root(root, storage_options)
    name, number = resolve_version(r, ref)
    version = VersionDataset(r, name, number, verify=True)
    splits, kinds = check_selection(version, split, classes)
    summary = dict(form.export(version, Path(dest), split=splits, classes=kinds, overwrite=overwrite, **opts))
    summary.setdefault("format", form.name)
    summary.setdefault("source", version.ref)
    return summary
