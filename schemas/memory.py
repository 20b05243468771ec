"""Refusing work that would need more memory than the machine has, before anything is allocated.

A spec model may say what one batch of its samples costs by defining ``peak_memory(samples_at_once) -> (bytes,
what)`` (e.g. ``ChestCTVolumeSpec``: voxels x bytes per voxel measured by tracemalloc on the real generator, see
docs/robustness.md). ``check_memory`` compares that, times the parallel workers, with the memory available to this
process (``MemAvailable`` of /proc/meminfo, capped by a cgroup limit) and raises one SpecError line naming the size,
the estimate, what is available and what to change. Specs that say nothing are not checked.
"""
from __future__ import annotations

import os
from typing import Any

from schemas.errors import SpecError


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def available_memory() -> int | None:
    """Bytes this process can still allocate without swapping: MemAvailable, capped by the cgroup's limit."""
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    for path, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(path, encoding="ascii") as f:
                raw = f.read().strip()
            if raw == "max":
                continue
            with open(usage, encoding="ascii") as f:
                used = int(f.read().strip())
            avail = min(avail, max(0, int(raw) - used))
        except (OSError, ValueError):
            continue
    return avail


def check_memory(spec: Any, workers: int = 1, what: str = "this build", available: int | None = None) -> None:
    """SpecError (one line) if ``workers`` workers, each holding one shard of ``spec``'s samples, would need more
    memory than is available. ``available`` overrides the measurement (tests)."""
    estimate = getattr(spec, "peak_memory", None)
    if estimate is None:
        return
    at_once = max(1, min(int(getattr(spec, "shard_size", 1)), int(getattr(spec, "samples", 1))))
    need, per = estimate(at_once)
    workers = max(1, int(workers))
    total = need * workers
    have = available_memory() if available is None else available
    if have is None or total <= have:
        return
    lanes = f" x {workers} workers" if workers > 1 else ""
    raise SpecError(f"{what} would need about {_gib(total)} of memory ({per}, {at_once} sample(s) per shard{lanes}) "
                    f"but {_gib(have)} is available; reduce the size, shard_size or --workers")
