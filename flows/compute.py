"""The build's compute pool: worker processes that generate and commit shards and draw the card's plots, and that
never import Prefect.

``pairforge build``'s default runner (``flows.runners``, ``local``) splits a build in two. Prefect's task runs (one
lane per worker, the card's plots, publish) run as threads of the build process, which holds the flow run and talks
to the API. The numpy/OpenCV work each of them asks for runs here: ``run_shard`` and ``run_plots`` hand it to this
process's pool (``activate``) and wait for it, or run it in place where there is none (a Dask or Ray worker, a
thread or process runner).

The pool's workers are forked as soon as the build's input is checked, before the build process imports Prefect:
they begin the first shards (``flows.head_start``) while Prefect and its API server start, and carry none of
Prefect's imports, threads or task engine. Retries, resume and Prefect's view of progress do not change: a lane is
still a task run with retries that skips shards whose marker exists and logs each shard it commits.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable

from flows import allocator, gcpause, interrupt

# What a worker imports before it forks (inherited) or when it starts (spawned): the pipeline, the store, what a
# shard's first write imports (flows.shard_imports) and the card's plotting stack (flows.card_imports).
COMPUTE_MODULES = ("annotators", "generators", "store", "flows.compute", "flows.browser", "flows.card",
                   "flows.shard_imports", "flows.card_imports")


def commit_shard(spec: Any, staging: Any, i: int, start: int, stop: int) -> dict[str, Any]:
    """Generate samples ``start..stop`` and commit them as shard ``i`` (its marker last): what a lane does per shard,
    and what a head start (flows.head_start) does before the flow run exists."""
    from flows.browser import sample_files as browser_files
    from flows.pipeline import make_samples

    allocator.tune()  # once per process, where PAIRFORGE_MALLOC=heap asks for it (flows/allocator.py)
    t0 = time.perf_counter()
    interrupt.hold("shard")
    samples = make_samples(spec, range(start, stop), digest=staging.digest, backend=_backend(spec, staging.digest))
    # The browser's per-sample images are drawn here, while the arrays are in memory (not at publish).
    info = dict(staging.write_shard(i, samples, sample_files=browser_files))
    info.update(shard=i, n=len(samples), reused=False, seconds=time.perf_counter() - t0)
    return info


_local = threading.local()


def _backend(spec: Any, digest: str):
    """One backend per worker (process or thread) and spec: a GPU backend loads its weights once per worker, not
    once per shard. Per thread, because a diffusers pipeline must not run two batches at once."""
    cached = getattr(_local, "backend", None)
    if cached is None or cached[0] != digest:
        from flows.pipeline import backend_for

        _local.backend = cached = (digest, backend_for(spec))
    return cached[1]


# ------------------------------------------------------------------------------------------------ the pool
def import_modules(names: tuple[str, ...]) -> None:
    """Import ``names`` (dotted module names): what a pool's workers need before their first job."""
    import importlib

    for name in names:
        importlib.import_module(name)


def init_worker(preload: tuple[str, ...] = ()) -> None:
    """A pool worker's initializer (this pool's, and Prefect's pool's before its own set-up): die with the build (a
    SIGKILLed ``pairforge build`` leaves no workers behind; they hold nothing a resumed build needs), leave Ctrl-C to
    the build process (a terminal's reaches the whole process group; the build decides and stops its workers),
    import ``preload`` with the garbage collector paused (flows.gcpause), then turn the collector on: a worker's is
    pairforge's own, and one forked from a ``pairforge build`` paused for its imports starts with it off."""
    import signal

    from flows.settings import die_with_parent

    gcpause.pause()
    die_with_parent(signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import_modules(preload)
    gcpause.resume()


def _ready() -> int:
    return os.getpid()


def start_method() -> str:
    """fork where it is sound (Linux, no other thread in this process that could hold a lock across the fork, no
    CUDA context), else spawn; ``PAIRFORGE_POOL_START`` overrides."""
    from schemas.errors import SpecError

    torch = sys.modules.get("torch")
    try:
        cuda = bool(torch is not None and torch.cuda.is_initialized())
    except Exception:
        cuda = True
    method = os.environ.get("PAIRFORGE_POOL_START") or (
        "fork" if sys.platform.startswith("linux") and threading.active_count() == 1 and not cuda else "spawn")
    if method not in ("fork", "spawn", "forkserver"):
        raise SpecError(f"PAIRFORGE_POOL_START={method!r}; accepted: fork, spawn, forkserver")
    return method


class ComputePool:
    """``workers`` processes (a ``ProcessPoolExecutor``) that import ``preload`` first; ``start()`` starts them all
    now (forked where ``start_method`` allows: they inherit every module this process has imported)."""

    def __init__(self, workers: int, preload: tuple[str, ...] = COMPUTE_MODULES):
        self.workers, self.preload = int(workers), tuple(preload)
        self.executor = None

    def start(self) -> "ComputePool":
        if self.executor is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            import_modules(self.preload)
            ctx = multiprocessing.get_context(start_method())
            self.executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=init_worker,
                                                initargs=(self.preload,))
            # Each submit starts a worker while none is idle: one job per worker starts them all now.
            for _ in range(self.workers):
                self.executor.submit(_ready)
        return self

    def close(self) -> None:
        """Stop the workers (after the jobs they hold); jobs not begun are cancelled."""
        executor, self.executor = self.executor, None
        if executor is not None:
            if "flows.head_start" in sys.modules:  # its jobs stop after the shard they hold
                sys.modules["flows.head_start"].close_all()
            executor.shutdown(wait=True, cancel_futures=True)

    # flows.head_start asks a runner (or this pool) for its executor this way
    def prestarted_executor(self):
        return None if self.executor is None else (self.executor, self.workers)


_active: tuple[int, ComputePool] | None = None  # (pid, pool) of the pool this process hands work to


def activate(pool: ComputePool | None) -> None:
    """Hand this process's shard and plot work to ``pool`` (None: run it in place again)."""
    global _active
    _active = None if pool is None else (os.getpid(), pool)


def active() -> ComputePool | None:
    """The pool this process hands work to (never a parent's, inherited across a fork)."""
    if _active is not None and _active[0] == os.getpid() and _active[1].executor is not None:
        return _active[1]
    return None


def run(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in this process's compute pool, or here where there is none."""
    pool = active()
    if pool is None:
        return fn(*args)
    from concurrent.futures.process import BrokenProcessPool

    try:
        return pool.executor.submit(fn, *args).result()
    except BrokenProcessPool:
        if interrupt.stopping():  # the build's own stop killed the workers: it exits in a moment, this thread waits
            threading.Event().wait()
        raise


def run_shard(spec: Any, staging: Any, i: int, start: int, stop: int) -> dict[str, Any]:
    """``commit_shard`` in the compute pool (or here)."""
    return run(commit_shard, spec, staging, i, start, stop)


def run_plots(staging: Any, domain: str | None) -> dict[str, Any]:
    """The card's plots (``flows.card.staged_plots``) in the compute pool (or here)."""
    from flows.card import staged_plots

    return run(staged_plots, staging, domain)
