"""Pull: copy a published version from any root to any destination root (local folders and fsspec URLs such as
``s3://bucket/prefix``, in every combination), so that the destination serves the version as a root of its own.

* **Verified.** Every file is checked against the source manifest (sample files against the index, whose own
  sha256 and the content digest are checked first) before it is written; a corrupted source file stops the pull
  with one line naming it, and nothing is published at the destination.
* **Resumable.** Files go to a staging place that a later pull of the same version finds again: on a local disk
  ``<dest>/<name>/_pull/v<N>-<manifest sha256 start>/``; on an object store ``<dest>/<name>/v<N>/`` itself
  (invisible while its manifest is missing, as for a publish). A killed pull resumes: staged files whose sha256
  matches the manifest are kept, the others copied.
* **Atomic.** The version appears whole or not at all: locally the staging folder is renamed to ``v<N>`` with the
  manifest inside (one step); on object stores ``manifest.json`` is written last with an exclusive create.
  The number is claimed first at the destination (``_versions/v<N>.json``, exclusive create, as a build does), so a
  pull never mixes with a build or with a pull of another version that has the same number.
* Concurrent transfers (``workers``), an optional rate limit (``limit_rate`` bytes/s) and progress events
  (``plan``, ``file``, ``done``) for a progress bar.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import ValidationError

from schemas.manifest import Manifest
from store.errors import IntegrityError, StoreError
from store.read import _version_files, manifest_problems, read_index, resolve_version, verify_version_at
from store.root import MANIFEST, Root, ensure_writable

Progress = Callable[[dict[str, Any]], None]
MIN_RATE = 64_000.0  # bytes/s: below it a pull of even a small version takes hours


@dataclass
class PullResult:
    ref: str
    uri: str                # the version at the destination
    files: int              # files of the version (the manifest not counted)
    bytes: int
    reused_files: int = 0   # already staged by an earlier, interrupted pull (sha256 checked)
    reused_bytes: int = 0
    seconds: float = 0.0
    already: bool = False   # the destination held this exact version already (verified, nothing copied)

    def __str__(self) -> str:
        if self.already:
            return f"{self.ref} is already at {self.uri} (all {self.files} files verified)"
        reused = f", {self.reused_files} already there from an earlier pull" if self.reused_files else ""
        rate = (self.bytes - self.reused_bytes) / max(self.seconds, 1e-9) / 1e6
        return (f"pulled {self.ref} to {self.uri}: {self.files} files, {self.bytes / 1e6:.2f} MB{reused}, "
                f"{self.seconds:.1f} s ({rate:.2f} MB/s), every sha256 checked")


class RateLimit:
    """At most ``rate`` bytes per second over all worker threads (None: no limit)."""

    def __init__(self, rate: float | None):
        self.rate = float(rate) if rate else None
        self.next_free = time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + n / self.rate
            wait_s = self.next_free - now
        if wait_s > 0:
            time.sleep(wait_s)


def parse_rate(text: str | float | int | None) -> float | None:
    """'500k', '20M', '1.5G', '1000' (bytes per second) -> float; None/'' -> None; else one-line StoreError."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        t = str(text).strip().upper().removesuffix("/S").removesuffix("B")
        mult = {"K": 1e3, "M": 1e6, "G": 1e9}.get(t[-1:], 1.0)
        try:
            value = float(t[:-1] if t[-1:] in "KMG" else t) * mult
        except ValueError:
            value = -1.0
    if not value > 0:
        raise StoreError(f"rate limit {text!r} is not a positive rate; write bytes per second, e.g. 500k, 20M or 1G")
    if value < MIN_RATE:
        raise StoreError(f"rate limit {text!r} is below the smallest accepted, 64k (64000 bytes per second); write "
                         "e.g. 500k, 20M or 1G")
    return value


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sizes(root: Root, base: str) -> dict[str, int]:
    """{relative path: size} of every file under ``base`` (empty when it does not exist)."""
    root.refresh()
    try:
        found = root.retrying(base, lambda: root.fs.find(base, detail=True))
    except FileNotFoundError:
        return {}
    base_stripped = base.rstrip("/") + "/"
    out = {}
    for p, info in found.items():
        p = p if root.local else root.fs._strip_protocol(p)
        if p.startswith(base_stripped) and info.get("type", "file") == "file":
            out[p[len(base_stripped):]] = int(info.get("size") or 0)
    return out


def _read(root: Root, path: str) -> bytes | None:
    """The file's bytes (transient storage errors retried, as every store operation), or None when it is missing."""
    try:
        return root.read_bytes(path)
    except FileNotFoundError:
        return None


def _write(root: Root, path: str, data: bytes) -> None:
    """Written whole: locally to a temporary name renamed into place (a killed pull never leaves a half-written file
    under its final name), on object stores in one PUT; transient errors retried."""
    root.write_bytes(path, data)


def pull_between(src: Root, ref: str, dest: Root, *, workers: int = 8, limit_rate: float | str | None = None,
                 progress: Progress | None = None) -> PullResult:
    """Copy ``ref`` (``name@vN``, ``name`` or ``name@latest``) from the root ``src`` to ``<dest>/<name>/v<N>/``."""
    t0 = time.perf_counter()
    emit = progress or (lambda ev: None)
    limiter = RateLimit(parse_rate(limit_rate))
    workers = max(1, int(workers))
    name, version = resolve_version(src, ref)
    ref = f"{name}@v{version}"
    base = src.join(name, f"v{version}")
    manifest_bytes = src.read_bytes(f"{base}/{MANIFEST}")
    try:
        m = Manifest.model_validate_json(manifest_bytes)
    except ValidationError as e:
        raise IntegrityError(f"cannot pull {ref}: manifest.json is not a valid manifest: {e.errors()[0]['msg']}",
                             [MANIFEST]) from None
    files, problems = _version_files(src, name, version, m)
    if not problems:  # a manifest that contradicts its spec, its counts or the index
        problems = manifest_problems(m, name, version, read_index(src, name, version, m, verify=True))
    if problems:
        raise IntegrityError(f"cannot pull {ref}: {problems[0]}", ["samples.parquet"])
    msha = _sha(manifest_bytes)
    src_sizes = _sizes(src, base)
    missing = sorted(set(files) - set(src_sizes))
    if missing:
        raise IntegrityError(f"cannot pull {ref}: {missing[0]} is missing at {src.url}"
                             + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""), missing)
    total = sum(src_sizes[r] for r in files)

    # ---- the destination: already there, or claim the number
    ensure_writable(dest)
    dest.refresh()
    final = dest.version_dir(name, version)
    final_uri = dest.uri(name, f"v{version}")
    if dest.exists(f"{final}/{MANIFEST}"):
        if _sha(dest.read_bytes(f"{final}/{MANIFEST}")) != msha:
            raise StoreError(f"{final_uri} already holds another {ref} (its manifest differs from the one at "
                             f"{src.url}); pull into another destination")
        rep = verify_version_at(dest, ref)
        if not rep.ok:
            raise IntegrityError(f"{final_uri} already exists and does not match {ref}: {rep.problems[0]}",
                                 rep.problems)
        emit({"event": "done", "ref": ref, "already": True})
        return PullResult(ref, final_uri, len(files), total, len(files), total, time.perf_counter() - t0, True)
    claim = dest.join(name, "_versions", f"v{version}.json")
    body = json.dumps({"pull": {"source": src.uri(name, f"v{version}"), "manifest_sha256": msha}},
                      sort_keys=True).encode()
    if not dest.create_exclusive(claim, body):
        try:
            held = json.loads(dest.read_bytes(claim))
        except (ValueError, OSError):
            held = {}
        if (held.get("pull") or {}).get("manifest_sha256") != msha:
            by = "a build" if "key" in held else "a pull of another version with that number"
            raise StoreError(f"version number v{version} of {name!r} is taken at {dest.url} by {by}; pull into "
                             "another destination")

    stage = dest.join(name, "_pull", f"v{version}-{msha[:16]}") if dest.local else final
    staged = _sizes(dest, stage)
    emit({"event": "plan", "ref": ref, "source": src.uri(name, f"v{version}"), "dest": final_uri,
          "files": len(files), "bytes": total, "staged": sum(1 for r in files if r in staged)})

    def copy(rel: str) -> tuple[str, int, bool]:
        target = f"{stage}/{rel}"
        size = src_sizes[rel]
        if staged.get(rel) == size:
            have = _read(dest, target)
            if have is not None and _sha(have) == files[rel]:
                return rel, size, True
        data = _read(src, f"{base}/{rel}")
        if data is None:
            raise IntegrityError(f"cannot pull {ref}: {rel} is missing at {src.url}", [rel])
        got = _sha(data)
        if got != files[rel]:
            raise IntegrityError(f"cannot pull {ref}: {rel}: sha256 mismatch at the source (expected "
                                 f"{files[rel][:12]}..., got {got[:12]}...); the file is corrupted at {src.url}, "
                                 "nothing was published", [rel])
        limiter.take(len(data))
        _write(dest, target, data)
        return rel, len(data), False

    reused_files = reused_bytes = 0
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pull")
    try:
        pending = {pool.submit(copy, rel) for rel in sorted(files)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                rel, n, reused = fut.result()  # raises the first failure; the rest is cancelled below
                reused_files += reused
                reused_bytes += n if reused else 0
                emit({"event": "file", "path": rel, "bytes": n, "reused": reused})
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

    # ---- commit: the manifest, last
    if dest.local:
        for rel in set(_sizes(dest, stage)) - set(files):  # e.g. a temporary file of a killed pull
            os.remove(f"{stage}/{rel}")
        _write(dest, f"{stage}/{MANIFEST}", manifest_bytes)
        try:
            os.rename(stage, final)  # the one atomic step that makes the version visible
        except OSError as e:
            raise StoreError(f"cannot publish the pulled {ref} at {final}: {e.strerror} (a folder v{version} "
                             "without a manifest is in the way?)") from None
        try:
            os.rmdir(dest.join(name, "_pull"))  # only when no other pull is staged there
        except OSError:
            pass
    elif not dest.create_exclusive(f"{final}/{MANIFEST}", manifest_bytes):
        if _sha(dest.read_bytes(f"{final}/{MANIFEST}")) != msha:  # a concurrent pull of the same version is fine
            raise StoreError(f"{final_uri} was published by someone else during the pull; pull into another "
                             "destination")
    dest.refresh()
    res = PullResult(ref, final_uri, len(files), total, reused_files, reused_bytes, time.perf_counter() - t0)
    emit({"event": "done", "ref": ref, "already": False, "files": len(files), "bytes": total,
          "reused_files": reused_files, "seconds": res.seconds})
    return res
