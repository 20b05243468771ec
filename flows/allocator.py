"""The C allocator's settings for processes that generate and write samples (glibc on Linux).

A 512x512 sample goes through dozens of temporary arrays of 0.3-8 MB (float64 planes, FFT buffers, PNG and
compression buffers). When this was written (the code of 2026-11-27), with glibc's defaults blocks that size are ``mmap``-ed and unmapped on ``free``, or the heap
top is trimmed after them, so the next sample faults the same memory in again: about 2,700 page faults, ~10 ms of
kernel time, per 512x512 chest-CT sample written (``perf stat -e page-faults`` on a one-worker build: 326,000 for 120
samples with the defaults, 67,000 with the settings below). ``tune()`` keeps such blocks on the heap
(``M_MMAP_THRESHOLD`` 16 MiB) and lets up to 64 MiB of freed heap stay with the process (``M_TRIM_THRESHOLD``), so
they are reused.

Opt-in since 2026-11-28 (it was on by default before): ``PAIRFORGE_MALLOC=heap`` applies it in the processes that run shards
(``flows.compute.commit_shard``, once per process) and in the ``pairforge build`` process; unset or ``default``
leaves glibc's own (adaptive) thresholds alone. Measured on a 2-core VM against the same loop without it (5
interleaved pairs each, ``bench/run_in_tree.sh TREE loop|loopplain N example EXAMPLE``): on 512x512 chest CT it no
longer pays (wall 1.035x, CPU 1.03x, same peak memory: later changes removed most of the big temporaries), and on
1024x1024 surface defects it costs 7 % of wall time and doubles a worker's peak memory (1,452 against 754 MiB: freed
8 MiB planes kept on a fragmented heap). Other values are refused with one line. Elsewhere (not glibc, not Linux) it
does nothing.
"""
from __future__ import annotations

import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 << 20
TRIM_THRESHOLD = 64 << 20

_applied: tuple[int, bool] | None = None  # (pid, applied) of the last call


MODES = ("default", "heap")


def requested() -> bool:
    """Whether ``PAIRFORGE_MALLOC`` asks for the settings (``heap``); SpecError for a value not in ``MODES``."""
    value = os.environ.get("PAIRFORGE_MALLOC", "").strip().lower()
    if value not in ("",) + MODES:
        from schemas.errors import SpecError

        raise SpecError(f"PAIRFORGE_MALLOC={value!r}; accepted: {', '.join(MODES)} (default: leave the allocator "
                        "alone)")
    return value == "heap"


def tune() -> bool:
    """Apply the settings once per process where ``PAIRFORGE_MALLOC=heap``; True when they are in effect."""
    global _applied
    if _applied is not None and _applied[0] == os.getpid():
        return _applied[1]
    ok = False
    if requested() and sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None)
            if hasattr(libc, "gnu_get_libc_version"):  # glibc (musl's mallopt does nothing)
                ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
                    bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        except (OSError, AttributeError):
            ok = False
    _applied = (os.getpid(), ok)
    return ok
