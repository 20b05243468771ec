"""Task runners by name: the local default, threads, processes, and Dask (local cluster or an existing one).

Shard tasks are numpy/OpenCV work that releases the GIL for much, not all, of a sample: they run in processes.
``local`` (the default) is ``LanePoolTaskRunner``: Prefect's thread pool runs the task runs (a lane per worker, the
card's plots) in the build process and each hands its numpy work to a compute pool of plain processes
(``flows.compute``) that never import Prefect, forked by ``pairforge build`` before it imports Prefect.
``--runner processes`` is ``WarmProcessPoolTaskRunner``, Prefect's process pool (the task runs themselves run in
its workers, which import Prefect). ``--runner threads`` starts no process and may suit small builds.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from flows.compute import _ready, import_modules, init_worker
from schemas.errors import SpecError

RUNNERS = ("local", "threads", "processes", "dask", "ray")
DEFAULT_LOCAL = "local"


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def init_pool_worker(preload: tuple[str, ...] = ()) -> None:
    """A Prefect process-pool worker's initializer: the compute pool's (``flows.compute.init_worker``: die with the
    build, leave Ctrl-C to it, import ``preload``), then Prefect's collections but those without block types
    (``prefect_compat.load_collections_except``)."""
    init_worker(preload)
    # Before the first task run: hydrating its context looks up a block class, which would load every Prefect
    # collection, Dask's and Ray's too (~0.7 s of CPU per worker; they register no block types).
    from flows import gcpause
    from flows import prefect_compat as compat

    with gcpause.imports():
        compat.load_collections_except()


def _process_pool_class():
    """``WarmProcessPoolTaskRunner``, built on first use so that importing this module does not import Prefect."""
    global _WarmPool
    if _WarmPool is not None:
        return _WarmPool
    import multiprocessing

    from flows import prefect_compat as compat

    class WarmProcessPoolTaskRunner(compat.process_pool_runner_class()):
        """Prefect's process pool whose workers can be started before the flow run: ``prestart()`` spawns them and
        runs their imports (Prefect and the generator stack, ~1.5 s of CPU each) while something else waits, e.g.
        the local API server starting. Without ``prestart()`` it is Prefect's ProcessPoolTaskRunner, with
        ``init_pool_worker(preload)`` as each worker's initializer."""

        def __init__(self, max_workers: int | None = None, preload: tuple[str, ...] = ()):
            self._preload = tuple(preload)
            super().__init__(max_workers=max_workers, initializer=init_pool_worker, initargs=(self._preload,))
            self._prestarted = None

        def prestart(self) -> "WarmProcessPoolTaskRunner":
            if self._prestarted is None:
                import_modules(self._preload)
                # Forked workers start with every module already imported (no ~1.5 s of imports each), where fork
                # is sound; otherwise spawn, as Prefect's own pool does (flows.compute.start_method).
                from flows.compute import start_method

                ctx = multiprocessing.get_context(start_method())
                n = compat.pool_max_workers(self)
                queue, executor = compat.start_pool_executor(ctx, n, init_pool_worker, (self._preload,))
                # Each submit spawns a worker while none is idle: one job per worker starts them all now.
                for _ in range(n):
                    executor.submit(_ready)
                self._prestarted = (queue, executor)
            return self

        def prestarted_executor(self):
            """``(executor, workers)`` of the prestarted pool (None before ``prestart()`` or once a flow took it):
            jobs submitted now run before the flow's tasks (flows.head_start)."""
            if self._prestarted is None:
                return None
            return self._prestarted[1], compat.pool_max_workers(self)

        def duplicate(self) -> "WarmProcessPoolTaskRunner":
            # The flow engine runs a duplicate of the flow's runner: hand the started workers over to it.
            dup = super().duplicate()
            dup._preload = self._preload
            dup._prestarted, self._prestarted = self._prestarted, None
            return dup

        def __enter__(self):
            if self._prestarted is None:
                return super().__enter__()
            queue, executor = self._prestarted
            self._prestarted = None
            return compat.enter_with_pool(self, queue, executor)

        def close_prestarted(self) -> None:
            """Stop workers that were started but never used by a flow run."""
            if self._prestarted is not None:
                if "flows.head_start" in sys.modules:  # its jobs stop after the shard they hold
                    sys.modules["flows.head_start"].close_all()
                queue, executor = self._prestarted
                self._prestarted = None
                executor.shutdown(wait=True, cancel_futures=True)
                queue.close()

    _WarmPool = WarmProcessPoolTaskRunner
    return _WarmPool


_WarmPool = None


def _lane_pool_class():
    """``LanePoolTaskRunner``, built on first use so that importing this module does not import Prefect."""
    global _LanePool
    if _LanePool is not None:
        return _LanePool
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows import compute

    class LanePoolTaskRunner(ThreadPoolTaskRunner):
        """Prefect's thread pool for the task runs (``lanes`` lanes and the card's plots) over a compute pool of
        ``lanes`` processes that does their numpy work (``flows.compute``). ``pool``: one started already (the
        CLI forks it before importing Prefect); otherwise ``prestart()`` or entering the runner starts one."""

        def __init__(self, max_workers: int | None = None, preload: tuple[str, ...] = compute.COMPUTE_MODULES,
                     pool: "compute.ComputePool | None" = None):
            self.lanes = int(max_workers or (pool.workers if pool is not None else default_workers()))
            super().__init__(max_workers=self.lanes + 1)  # the lanes and the card's plots
            self._preload = tuple(preload)
            self._pool = pool

        def prestart(self) -> "LanePoolTaskRunner":
            if self._pool is None:
                self._pool = compute.ComputePool(self.lanes, self._preload)
            self._pool.start()
            return self

        def prestarted_executor(self):
            """``(executor, workers)`` of the compute pool (None before ``prestart()``): jobs submitted now run
            before the flow's (flows.head_start)."""
            return None if self._pool is None else self._pool.prestarted_executor()

        def duplicate(self) -> "LanePoolTaskRunner":
            # The flow engine runs a duplicate of the flow's runner: hand the started workers over to it.
            dup = type(self)(max_workers=self.lanes, preload=self._preload, pool=self._pool)
            self._pool = None
            return dup

        def __enter__(self):
            super().__enter__()
            if self._pool is None:
                self._pool = compute.ComputePool(self.lanes, self._preload)
            compute.activate(self._pool.start())
            return self

        def __exit__(self, *exc: Any) -> None:
            try:
                super().__exit__(*exc)
            finally:
                compute.activate(None)
                self.close_prestarted()

        def close_prestarted(self) -> None:
            """Stop the compute pool's workers (started for a run that never took them, or at the run's end)."""
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.close()

        def __getstate__(self) -> dict[str, Any]:
            state = super().__getstate__()
            state["_pool"] = None  # processes stay with the process that started them
            return state

    _LanePool = LanePoolTaskRunner
    return _LanePool


_LanePool = None


def check_runner(kind: str = "local", workers: int | None = None, dask_address: str | None = None) -> str:
    """The runner kind these options name (``local`` resolved); SpecError for a bad combination. Imports nothing."""
    if dask_address and kind in ("local", "dask"):
        kind = "dask"
    elif dask_address:
        raise SpecError(f"--dask-address needs --runner dask, not --runner {kind}")
    if kind not in RUNNERS:
        raise SpecError(f"unknown runner {kind!r}; accepted: {', '.join(RUNNERS)}")
    if workers is not None and workers < 1:
        raise SpecError(f"--workers must be at least 1, not {workers}")
    if dask_address and not dask_address.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
        raise SpecError(f"--dask-address {dask_address!r} is not a scheduler address like tcp://host:8786")
    return DEFAULT_LOCAL if kind == "local" else kind


def make_task_runner(kind: str = "local", workers: int | None = None, dask_address: str | None = None,
                     preload: tuple[str, ...] = (), pool: Any = None):
    """A Prefect task runner for ``kind``. ``dask_address`` (tcp://host:port) implies Dask on that cluster.
    ``preload``: modules a Prefect process pool's workers import when they start (before their first task).
    ``pool``: for ``local``, a compute pool started already (``flows.compute.ComputePool``)."""
    kind = check_runner(kind, workers, dask_address)
    n = workers or (pool.workers if pool is not None else default_workers())
    if kind == "local":
        return _lane_pool_class()(max_workers=n, pool=pool)
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=n)
    if kind == "processes":
        return _process_pool_class()(max_workers=n, preload=preload)
    if kind == "ray":
        return _ray_runner(n)
    from schemas.extras import import_extra

    DaskTaskRunner = import_extra("prefect_dask", "--runner dask", "dask").DaskTaskRunner
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    # Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in its workers, so every large numpy temporary becomes a fresh
    # mmap; measured here that makes a 512x512 sample ~45 % slower (47 -> 68 ms). Shards hold no memory between
    # tasks, so the local cluster's workers keep glibc's default (None unsets it; see distributed's nanny).
    import dask

    dask.config.set({
        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
        # A worker's statistical profiler walks every thread's stack 100 times a second and its monitors poll
        # memory and the system 10 and 2 times a second, each taking the GIL from the shard thread. Shards are
        # seconds long: no profiler, monitors once a second.
        "distributed.worker.profile.enabled": False,
        "distributed.worker.memory.monitor-interval": "1s",
        "distributed.admin.system-monitor.interval": "1s",
        # Every event loop (scheduler, nannies, workers) measures its own latency every 20 ms; for seconds-long
        # shards twice a second does.
        "distributed.admin.tick.interval": "500ms",
    })
    # Workers of a local cluster log a heartbeat error when the cluster closes under them at the end of a build;
    # shard failures reach the user through Prefect, so the workers' own logging stays at CRITICAL.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "critical")
    # One thread per worker process, as the issue asks: each worker runs one shard at a time.
    return DaskTaskRunner(cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


def _ray_runner(n: int):
    """prefect-ray's RayTaskRunner (the optional ``ray`` extra). A local Ray with ``n`` CPUs, one shard per CPU; or
    the cluster ``RAY_ADDRESS`` names (``ray://host:10001``, Ray's own variable), as ``ray.init`` does."""
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise SpecError("--runner ray needs the ray extra: pip install 'pairforge[ray]'") from None
    if os.environ.get("RAY_ADDRESS"):
        return RayTaskRunner(address=os.environ["RAY_ADDRESS"])
    return RayTaskRunner(init_kwargs={"num_cpus": n, "include_dashboard": False, "log_to_driver": False,
                                      "configure_logging": False})


def parallelism(task_runner) -> int | None:
    """How many shards ``task_runner`` runs at once, where it says: the default runner's lanes, a thread or process
    pool's workers, a local Dask cluster's workers x threads, a local Ray's CPUs. None for an existing cluster (its
    size is not known here)."""
    n = getattr(task_runner, "lanes", None)
    if isinstance(n, int) and n > 0:
        return n
    n = getattr(task_runner, "_max_workers", None)
    if isinstance(n, int) and n > 0:
        return n
    if getattr(task_runner, "address", None):
        return None
    ck = getattr(task_runner, "cluster_kwargs", None)
    if isinstance(ck, dict) and isinstance(ck.get("n_workers"), int):
        return ck["n_workers"] * int(ck.get("threads_per_worker") or 1)
    ik = getattr(task_runner, "init_kwargs", None)
    if isinstance(ik, dict) and isinstance(ik.get("num_cpus"), int):
        return ik["num_cpus"]
    return None


def describe(kind: str, workers: int | None, dask_address: str | None) -> str:
    if dask_address:
        return f"dask @ {dask_address}"
    n = workers or default_workers()
    return f"{kind} x{n}"
