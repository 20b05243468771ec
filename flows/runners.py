"""Task runners by name: the local default, threads, processes, and Dask (local cluster or an existing one).

Shard tasks are numpy/OpenCV work that releases the GIL for much, not all, of a sample. On the project's 2-core
machine, building 2,000 samples of 512x512, Prefect's process pool was 3-6 % faster than its thread pool in every
quiet run (45.3 vs 43.5 samples/s; docs/performance.md), so ``local`` means processes. Threads start faster and
win on small builds (a few hundred samples): ``--runner threads``.
"""
from __future__ import annotations

import os

from schemas.errors import SpecError

RUNNERS = ("local", "threads", "processes", "dask")
DEFAULT_LOCAL = "processes"


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def make_task_runner(kind: str = "local", workers: int | None = None, dask_address: str | None = None):
    """A Prefect task runner for ``kind``. ``dask_address`` (tcp://host:port) implies Dask on that cluster."""
    if dask_address and kind in ("local", "dask"):
        kind = "dask"
    elif dask_address:
        raise SpecError(f"--dask-address needs --runner dask, not --runner {kind}")
    if kind not in RUNNERS:
        raise SpecError(f"unknown runner {kind!r}; accepted: {', '.join(RUNNERS)}")
    if workers is not None and workers < 1:
        raise SpecError(f"--workers must be at least 1, not {workers}")
    n = workers or default_workers()
    if kind == "local":
        kind = DEFAULT_LOCAL
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=n)
    if kind == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=n)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as e:  # pragma: no cover - prefect-dask is a declared dependency
        raise SpecError(f"--runner dask needs prefect-dask installed ({e})") from None
    if dask_address:
        if not dask_address.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
            raise SpecError(f"--dask-address {dask_address!r} is not a scheduler address like tcp://host:8786")
        return DaskTaskRunner(address=dask_address)
    # Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in its workers, so every large numpy temporary becomes a fresh
    # mmap; measured here that makes a 512x512 sample ~45 % slower (47 -> 68 ms). Shards hold no memory between
    # tasks, so the local cluster's workers keep glibc's default (None unsets it; see distributed's nanny).
    import dask

    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    # Workers of a local cluster log a heartbeat error when the cluster closes under them at the end of a build;
    # shard failures reach the user through Prefect, so the workers' own logging stays at CRITICAL.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "critical")
    # One thread per worker process, as the issue asks: each worker runs one shard at a time.
    return DaskTaskRunner(cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


def describe(kind: str, workers: int | None, dask_address: str | None) -> str:
    if dask_address:
        return f"dask @ {dask_address}"
    n = workers or default_workers()
    k = DEFAULT_LOCAL if kind == "local" else kind
    return f"{k} x{n}"
