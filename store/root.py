"""Where datasets live: resolving a root (local folder or fsspec URL), dataset names and refs, the folder layout,
and the few storage primitives the store needs (exclusive create, atomic local rename, listing).

Layout under a root::

    <root>/<name>/v<N>/                 a published version: manifest.json (the commit marker, written last),
                                        samples.parquet, README.md, images/, labels/, instances/
    <root>/<name>/_versions/v<N>.json   the reservation of number N (exclusive create)
    <root>/<name>/_staging/<key>/       a build in progress (key = spec digest + code version)
    <root>/<name>/_pull/v<N>-<sha>/     a pull in progress into a local root (store/transfer.py)
"""
from __future__ import annotations

import errno
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import fsspec
from fsspec.core import url_to_fs

from store.errors import NoSpaceError, StoreError

T = TypeVar("T")

# Storage errors worth another try (an object store's 5xx, throttling, timeouts, reset connections; a local EIO).
# Not retried: no space, no permission, missing or existing files, bad input (StoreError).
RETRY_ATTEMPTS = 6          # tries in all, per storage operation
RETRY_BASE_S = 0.2          # first back-off; doubles each try ("full jitter": a uniform draw up to it)
RETRY_CAP_S = 5.0           # no single wait is longer
NO_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
PERMANENT_OSERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_jitter = random.Random()  # back-off jitter only (never sample randomness)


def is_transient(e: BaseException) -> bool:
    """True for storage errors another try may cure."""
    if isinstance(e, StoreError):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    if isinstance(e, PERMANENT_OSERRORS):
        return False
    if isinstance(e, OSError):
        return e.errno not in NO_SPACE_ERRNOS | {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG}
    # botocore/aiohttp errors s3fs lets through after its own retries (read timeouts, dropped connections)
    mod = type(e).__module__ or ""
    return mod.startswith(("botocore", "aiobotocore", "aiohttp", "urllib3")) and "Credential" not in type(e).__name__

DEFAULT_ROOT = "./datasets"  # kept for imports; the default root now comes from store.config (not the cwd)
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
REF_RE = re.compile(r"^(?P<name>[^@]+?)(?:@(?:v(?P<version>\d+)|(?P<latest>latest)))?$")
MANIFEST = "manifest.json"
SAMPLES = "samples.parquet"
README = "README.md"
SAMPLE_DIRS = ("images", "labels", "instances")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise StoreError(f"dataset name {name!r} is not allowed; use 1-64 lowercase letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit (no '/', no '..')")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``name@v3`` -> (name, 3); ``name`` or ``name@latest`` -> (name, None)."""
    if not isinstance(ref, str):
        raise StoreError(f"dataset ref {ref!r} is not text; write <name>@v<N>, e.g. chest-ct-nodules@v3")
    m = REF_RE.match(ref.strip())
    if not m:
        raise StoreError(f"dataset ref {ref!r} is not valid; write <name>@v<N> (e.g. chest-ct-nodules@v3) or "
                         "<name>@latest")
    name = check_name(m.group("name"))
    v = m.group("version")
    if v is not None and int(v) < 1:
        raise StoreError(f"dataset ref {ref!r}: versions start at v1")
    return name, (int(v) if v is not None else None)


@dataclass
class Root:
    """A resolved dataset root: the fsspec filesystem and the root path inside it."""

    url: str
    fs: Any
    path: str
    local: bool
    source: str = "--root"  # where the root came from (store.config.choose_root)
    storage_options: dict = field(default_factory=dict)  # what fsspec was given (endpoint, keys): the card reuses it

    @property
    def origin(self) -> str:
        """"dataset root X (from ...); change it with ..." for error messages."""
        from store.config import HOW_TO_CHANGE, source_words

        return f"{source_words(self.source)}; {HOW_TO_CHANGE}"

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/")] + [p.strip("/") for p in parts if p])

    def uri(self, *parts: str) -> str:
        p = self.join(*parts)
        if self.local:
            return p
        return self.fs.unstrip_protocol(p)

    def dataset_dir(self, name: str) -> str:
        return self.join(check_name(name))

    def version_dir(self, name: str, version: int) -> str:
        return self.join(check_name(name), f"v{int(version)}")

    # ---- storage primitives
    def refresh(self) -> None:
        if not self.local:
            self.fs.invalidate_cache()

    def retrying(self, what: str, fn: Callable[[], T]) -> T:
        """Run one storage operation, retrying transient errors with bounded exponential back-off and full jitter;
        a full disk becomes one line (NoSpaceError) at once."""
        for attempt in range(RETRY_ATTEMPTS):
            try:
                return fn()
            except OSError as e:
                if e.errno in NO_SPACE_ERRNOS:
                    raise NoSpaceError(f"dataset root {self.url!r}: no space left on device while writing {what}; "
                                       "free space or choose another root, then run the build again (it resumes)") \
                        from None
                if attempt == RETRY_ATTEMPTS - 1 or not is_transient(e):
                    raise
            except Exception as e:
                if attempt == RETRY_ATTEMPTS - 1 or not is_transient(e):
                    raise
            time.sleep(_jitter.uniform(0, min(RETRY_CAP_S, RETRY_BASE_S * 2 ** attempt)))
            self.refresh()
        raise AssertionError("unreachable")

    def _inject(self, op: str, path: str) -> None:
        """Fault-injection point of local writes (bench/faults.py's filesystem raises ENOSPC/EIO here); no-op on a
        plain local filesystem."""
        hook = getattr(self.fs, "inject_fault", None)
        if hook is not None:
            hook(op, path)

    def exists(self, path: str) -> bool:
        try:
            return bool(self.retrying(path, lambda: self.fs.exists(path)))
        except (PermissionError, OSError):
            return False

    def read_bytes(self, path: str) -> bytes:
        return self.retrying(path, lambda: self.fs.cat_file(path))

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file. Local files are written to a temp name and renamed (never half-written)."""
        if self.local:
            self.retrying(path, lambda: self._write_local(path, data))
        else:
            self.retrying(path, lambda: self.fs.pipe_file(path, data))

    def _write_local(self, path: str, data: bytes, make_dirs: bool = True) -> None:
        if make_dirs:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{_unique()}"
        try:
            self._inject("write", tmp)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            self._inject("rename", path)
            os.replace(tmp, path)
        except BaseException:
            with _suppress_oserror():
                os.remove(tmp)
            raise

    def write_many(self, files: dict[str, bytes]) -> None:
        if self.local:
            for folder in {os.path.dirname(p) for p in files}:  # each folder once, not once per file
                self.retrying(folder, lambda folder=folder: os.makedirs(folder, exist_ok=True))
            for p, d in files.items():
                self.retrying(p, lambda p=p, d=d: self._write_local(p, d, make_dirs=False))
        else:
            what = f"{len(files)} files under {os.path.dirname(next(iter(files)))}" if files else "no files"
            self.retrying(what, lambda: self.fs.pipe(files))  # concurrent uploads on object stores

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create ``path`` only if it does not exist (atomic on local disks and on S3 via If-None-Match).
        Returns False when it already exists with other content. A file that exists with exactly ``data`` counts as
        ours (True): an earlier try whose answer was lost, or a process of the same build writing the same bytes."""
        if self.retrying(path, lambda: self._create_once(path, data)):
            return True
        try:
            return self.read_bytes(path) == data
        except FileNotFoundError:  # removed meanwhile (a released staging): it is not ours
            return False

    def _create_once(self, path: str, data: bytes) -> bool:
        if self.local:
            # Written to a temp name, then hard-linked to ``path`` (link fails if it exists): the file appears
            # whole, so a reader never sees it empty or half-written.
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{_unique()}"
            try:
                self._inject("write", tmp)
                with open(tmp, "wb") as f:
                    f.write(data)
                self._inject("rename", path)
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
                except OSError as e:  # a filesystem without hard links: exclusive open, then write
                    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                        raise
                    try:
                        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    except FileExistsError:
                        return False
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                return True
            finally:
                with _suppress_oserror():
                    os.remove(tmp)
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except OSError as e:  # s3fs reports a failed If-None-Match as an OSError (412 PreconditionFailed)
            if "precondition" in str(e).lower() or "412" in str(e):
                return False
            raise

    def find_files(self, base: str) -> list[str]:
        """Every file under ``base`` (recursive), as ``fs.find`` names them, sorted; [] when there is none. Local
        disks are walked with ``os.scandir`` (no stat per file: a version of 10,000 samples has 70,000 files, and
        fsspec's ``find`` stats each one)."""
        if not self.local:
            return sorted(self.retrying(base, lambda: self.fs.find(base)))
        top = self.fs._strip_protocol(base).rstrip("/")

        def walk() -> list[str]:
            out: list[str] = []
            stack = [top]
            while stack:
                folder = stack.pop()
                try:
                    with os.scandir(folder) as it:
                        for e in it:
                            (stack if e.is_dir(follow_symlinks=False) else out).append(f"{folder}/{e.name}")
                except (FileNotFoundError, NotADirectoryError):
                    continue
            return sorted(out)

        return self.retrying(base, walk)

    def listdir_names(self, path: str) -> list[str]:
        self.refresh()
        try:
            entries = self.retrying(path, lambda: self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []
        except (PermissionError, OSError) as e:
            raise StoreError(f"cannot list {self.url!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r})"
                             "; check the root, its credentials and endpoint") from None
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries})

    def rm(self, path: str) -> None:
        def once():
            self.refresh()
            try:
                self.fs.rm(path, recursive=True)
            except FileNotFoundError:
                pass
        self.retrying(path, once)


class _suppress_oserror:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, OSError)


def _unique() -> str:
    """A name part no other writer uses at the same time (process and thread)."""
    return f"{os.getpid()}-{threading.get_ident()}"


def resolve_root(root: str | os.PathLike | None = None, storage_options: dict | None = None) -> Root:
    """None -> the configured root (store.config: $PAIRFORGE_ROOT, pairforge.toml, user config, default).
    A local path or any fsspec URL (s3://bucket/prefix). Without ``storage_options``, a remote URL gets those of
    the store config (store.config.storage_options_for: $PAIRFORGE_STORAGE_OPTIONS, [storage.s3] in pairforge.toml
    or the user config)."""
    from store.config import choose_root, storage_options_for

    choice = choose_root(root)
    url = choice.url
    if not isinstance(url, str) or not url.strip():
        raise StoreError("dataset root is empty; give a folder or an fsspec URL such as s3://bucket/prefix")
    url = url.strip()
    if storage_options is None:
        storage_options = storage_options_for(url)
    try:
        fs, path = url_to_fs(url, **(storage_options or {}))
    except (ValueError, ImportError) as e:
        proto = url.split("://", 1)[0] if "://" in url else url
        known = "a local folder, s3://bucket/prefix (needs s3fs), gs://, az://, memory://"
        raise StoreError(f"dataset root {url!r} cannot be used ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         f"protocol {proto!r}; accepted: {known}") from None
    from fsspec.implementations.local import LocalFileSystem

    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    local = "file" in protocols or "local" in protocols or isinstance(fs, LocalFileSystem)
    if local:
        path = os.path.abspath(path)
    return Root(url=url, fs=fs, path=path.rstrip("/") or "/", local=local, source=choice.source,
                storage_options=dict(storage_options or {}))


def ensure_writable(root: Root) -> None:
    """Create the root if needed and check it can be written; one readable line when not."""
    probe = root.join(f".pairforge-write-probe-{_unique()}")
    where = "folder" if root.local else "bucket or prefix"
    try:
        if root.local:
            os.makedirs(root.path, exist_ok=True)
            root.write_bytes(probe, b"ok")
            os.remove(probe)
        else:
            root.retrying(root.url, lambda: root.fs.pipe_file(probe, b"ok"))
            root.rm(probe)
    except NoSpaceError:
        raise
    except PermissionError as e:
        raise StoreError(f"dataset root {root.url!r} is not writable ({_why(e)}); choose a writable {where} "
                         f"({root.origin})") from None
    except (NotADirectoryError, FileExistsError):
        raise StoreError(f"dataset root {root.url!r} is not a folder (a file is in the way); choose a folder "
                         f"({root.origin})") from None
    except FileNotFoundError as e:
        what = "its parent folder cannot hold new folders" if root.local else "its bucket does not exist"
        raise StoreError(f"dataset root {root.url!r} cannot be created: {what} ({_why(e)}); choose a writable "
                         f"{where} ({root.origin})") from None
    except Exception as e:  # object-store clients raise their own types (bad bucket names, endpoints, ...)
        raise StoreError(f"dataset root {root.url!r} is not writable ({_why(e)}); choose a writable {where} "
                         f"({root.origin})") from None


def _why(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return " ".join(str(text).split())[:200]


def ensure_readable(root: Root) -> None:
    try:
        ok = root.fs.isdir(root.path) if root.local else (root.fs.exists(root.path) or True)
        top = root.path.strip("/").split("/", 1)[0]
        if not root.local and top and "://" in root.url and not root.fs.exists(root.path) and not root.fs.exists(top):
            raise StoreError(f"dataset root {root.url!r} cannot be read: its bucket {top!r} does not exist (or these "
                             f"credentials cannot see it); check the URL, the credentials and the endpoint "
                             f"([storage.<protocol>] in the config, see `pairforge root`)")
    except (PermissionError, OSError) as e:
        raise StoreError(f"dataset root {root.url!r} cannot be read ({type(e).__name__}: {e})") from None
    if root.local and not ok:
        what = "is not a folder" if os.path.exists(root.path) else "does not exist"
        raise StoreError(f"dataset root {root.url!r} {what}; {root.origin}")


def open_url(url: str, storage_options: dict | None = None):
    return fsspec.open(url, "rb", **(storage_options or {}))
