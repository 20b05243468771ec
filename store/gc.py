"""Garbage collection of dead builds: staging areas (``<name>/_staging/<key>/``) that no process works on any more,
and, on object stores, the manifest-less ``<name>/v<N>/`` prefixes such builds wrote into.

A staging area is *live* while its last sign of life is younger than the threshold: a heartbeat
(``heartbeats/<token>.json``, rewritten every 30 s by a running build and by a publish), the publish lease, or
the newest file of ``build.json`` and ``parts/``. Only dead ones are listed; only ``remove=True`` deletes them.
Reservations (``_versions/v<N>.json``) are never removed: a number once handed out is never reused, since files
watermarked with it may exist.
"""
from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import dataclass, field

from store.build import last_heartbeat
from store.errors import StoreError
from store.root import MANIFEST, Root, check_name

DEFAULT_OLDER_THAN_S = 3600.0


@dataclass
class Garbage:
    """One dead build's leftovers."""

    name: str
    kind: str                 # "staging" or "unpublished version"
    path: str                 # what would be removed (a folder or prefix)
    age_s: float              # seconds since its last sign of life
    version: int | None = None
    shards_done: int = 0
    removed: bool = False

    def describe(self) -> str:
        v = f" v{self.version}" if self.version is not None else ""
        what = f"{self.kind} of {self.name}{v}"
        extra = f", {self.shards_done} shards done" if self.kind == "staging" else ""
        return f"{what}: {self.path} (last activity {_age(self.age_s)} ago{extra})"


@dataclass
class GcReport:
    root: str
    older_than_s: float
    dead: list[Garbage] = field(default_factory=list)
    live: list[str] = field(default_factory=list)   # staging folders left alone because they are live
    removed: int = 0


def _age(s: float) -> str:
    s = max(0.0, s)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``1h``, ``2d``, or a plain number of seconds -> seconds."""
    t = str(text).strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if t and t[-1] in units:
            value = float(t[:-1]) * units[t[-1]]
        else:
            value = float(t)
    except ValueError:
        value = -1.0
    if not (value >= 0) or value == float("inf"):
        raise StoreError(f"--older-than {text!r} is not a duration; write e.g. 90s, 30m, 1h or 2d")
    return value


def _mtime(info: dict) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(key)
        if v is None:
            continue
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, _dt.datetime):
            return v.timestamp()
        try:
            return _dt.datetime.fromisoformat(str(v)).timestamp()
        except ValueError:
            continue
    return None


def _newest(root: Root, path: str) -> float | None:
    """Newest modification time of the files under ``path`` (one listing), or None if there are none."""
    root.refresh()
    try:
        found = root.retrying(path, lambda: root.fs.find(path, detail=True))
    except FileNotFoundError:
        return None
    times = [t for t in (_mtime(i) for i in found.values()) if t is not None]
    return max(times) if times else None


def _lease_time(root: Root, staging: str) -> float | None:
    try:
        return float(json.loads(root.read_bytes(f"{staging}/publish.lease"))["time"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def last_activity(root: Root, staging: str) -> float | None:
    """Epoch seconds of a staging area's newest sign of life: heartbeats, the publish lease, file times."""
    signs = [last_heartbeat(root, staging), _lease_time(root, staging), _newest(root, staging)]
    signs = [s for s in signs if s is not None]
    return max(signs) if signs else None


def collect(root: Root, older_than_s: float = DEFAULT_OLDER_THAN_S, remove: bool = False,
            names: list[str] | None = None) -> GcReport:
    """Find (and with ``remove``, delete) the leftovers of dead builds under ``root``."""
    report = GcReport(root=root.url, older_than_s=older_than_s)
    now = time.time()
    for name in names if names is not None else root.listdir_names(root.path):
        if name.startswith((".", "_")):
            continue
        try:
            check_name(name)
        except StoreError:
            continue
        referenced: set[int] = set()
        for key in root.listdir_names(root.join(name, "_staging")):
            staging = root.join(name, "_staging", key)
            version = None
            try:
                version = int(json.loads(root.read_bytes(f"{staging}/build.json"))["version"])
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                pass
            if version is not None:
                referenced.add(version)
            seen = last_activity(root, staging)
            age = now - seen if seen is not None else float("inf")
            if age < older_than_s:
                report.live.append(staging)
                continue
            done = sum(1 for n in root.listdir_names(f"{staging}/parts") if n.endswith(".done.json"))
            report.dead.append(Garbage(name, "staging", root.uri(name, "_staging", key), age, version, done))
            if not root.local and version is not None and not root.exists(root.join(name, f"v{version}", MANIFEST)):
                vdir = root.join(name, f"v{version}")
                if root.fs.exists(vdir):
                    report.dead.append(Garbage(name, "unpublished version", root.uri(name, f"v{version}"), age,
                                               version))
        if not root.local:  # prefixes written by builds whose staging is gone, never published
            for entry in root.listdir_names(root.dataset_dir(name)):
                if not (entry.startswith("v") and entry[1:].isdigit()) or int(entry[1:]) in referenced:
                    continue
                vdir = root.join(name, entry)
                if root.exists(f"{vdir}/{MANIFEST}"):
                    continue
                seen = _newest(root, vdir)
                age = now - seen if seen is not None else float("inf")
                if age >= older_than_s:
                    report.dead.append(Garbage(name, "unpublished version", root.uri(name, entry), age,
                                               int(entry[1:])))
    if remove:
        revived: set[tuple[str, int | None]] = set()
        for g in report.dead:
            # Look again just before removing: a build resumed since the listing is live again.
            if g.kind == "staging":
                staging = root.join(g.name, "_staging", g.path.rstrip("/").rsplit("/", 1)[-1])
                seen = last_activity(root, staging)
                if seen is not None and time.time() - seen < older_than_s:
                    revived.add((g.name, g.version))
                    continue
            elif (g.name, g.version) in revived or root.exists(root.join(g.name, f"v{g.version}", MANIFEST)):
                continue
            root.rm(root.fs._strip_protocol(g.path) if not root.local else g.path)
            g.removed = True
            report.removed += 1
    return report
