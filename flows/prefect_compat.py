"""The Prefect internals pairforge relies on, in one place: private names, private attributes, private environment
variables and the server's app factory, used by ``flows.settings`` (the local API server it starts) and
``flows.runners`` (a process pool started before the flow run). Nothing here is Prefect's public API, so a Prefect
upgrade may break any of it; ``tests/test_prefect_compat.py`` checks every entry of ``PRIVATE_APIS`` against the
installed Prefect and names the one that changed.

Importing this module imports nothing from Prefect (``flows.settings`` must run before Prefect is imported).
"""
from __future__ import annotations

import threading
from typing import Any, Callable

# ``uvicorn --factory`` target: Prefect's app factory (what Prefect's ephemeral mode and ``prefect server start`` run),
# called by ``flows.server_app.create_app`` after ``load_collections_except``.
PREFECT_APP_FACTORY = "prefect.server.api.server:create_app"
SERVER_APP_FACTORY = "flows.server_app:create_app"
# Read by create_app: "ephemeral" skips the background services; "final" builds the app as the process's last one.
SERVER_EPHEMERAL_ENV = "PREFECT__SERVER_EPHEMERAL"
SERVER_FINAL_ENV = "PREFECT__SERVER_FINAL"

# The ProcessPoolTaskRunner attributes a pre-started pool sets (what ProcessPoolTaskRunner.__enter__ sets).
POOL_ATTRIBUTES = ("_max_workers", "_executor", "_resolver_executor", "_subprocess_message_queue",
                   "_message_forwarding_thread")

# (module, name, what pairforge uses it for). The compatibility test walks this table.
PRIVATE_APIS: tuple[tuple[str, str, str], ...] = (
    ("prefect.task_runners", "_initialize_process_pool_worker",
     "initializer (message_queue, initializer, initargs) of a process pool's workers: log/event forwarding"),
    ("prefect.task_runners", "ProcessPoolTaskRunner._forward_subprocess_messages",
     "the thread target that forwards the workers' logs and events to the API"),
    ("prefect.task_runners", "ProcessPoolTaskRunner." + "/".join(POOL_ATTRIBUTES),
     "the state a pre-started pool hands to the runner in place of ProcessPoolTaskRunner.__enter__"),
    ("prefect.task_runners", "TaskRunner.__enter__",
     "marks a runner started without ProcessPoolTaskRunner.__enter__ starting a second pool"),
    ("prefect.context", "refresh_global_settings_context",
     "makes a PREFECT_API_URL exported mid-process visible to threads Prefect starts outside any context"),
    ("prefect.settings", "Settings.to_environment_variables(exclude_unset=)",
     "carries this process's settings over to the local API server process"),
    ("prefect.server.api.server", f"create_app(ephemeral=, final=) reading {SERVER_EPHEMERAL_ENV}/{SERVER_FINAL_ENV}",
     "the app the local API server runs, configured through those environment variables"),
    ("prefect.logging.handlers", "APILogWorker.drain_all(timeout=)", "flushes logs while the server still answers"),
    ("prefect.events.worker", "EventsWorker.drain_all(timeout=)", "flushes events while the server still answers"),
    ("prefect._internal.plugins.collections", "_collections/safe_load_entrypoints",
     "the per-process cache of loaded collections, filled by load_collections_except"),
)

# Installed Prefect integrations (entry points in the ``prefect.collections`` group) that register no block types.
# Prefect loads every collection the first time a process looks up a block class (hydrating a task run's context
# in a pool worker does, for its result storage) and when its API server starts: importing these two means
# importing Dask's distributed and Ray, ~0.7 s of CPU in each of those processes, for nothing a build reads.
# pairforge imports them itself where it uses them (flows.runners: --runner dask / ray).
BLOCKLESS_COLLECTIONS = frozenset({"prefect_dask", "prefect_ray"})


# ------------------------------------------------------------------------------------------- settings and server
def refresh_settings_context() -> None:
    """Re-read Prefect's settings from the environment into its process-global settings context."""
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()


def settings_environment() -> dict[str, str]:
    """This process's explicitly set Prefect settings (profiles, ``temporary_settings``) as environment variables."""
    from prefect.settings import get_current_settings

    return get_current_settings().to_environment_variables(exclude_unset=True)


def drain_background_workers(timeout: float = 5) -> None:
    """Flush Prefect's background log and event workers (call while the API still answers); one failing does not
    keep the other from draining."""
    import contextlib

    with contextlib.suppress(Exception):
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=timeout)
    with contextlib.suppress(Exception):
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=timeout)


def load_collections_except(names: frozenset[str] = BLOCKLESS_COLLECTIONS) -> list[str]:
    """Load Prefect's collections in this process now, as ``prefect.plugins.load_prefect_collections`` does, except
    ``names`` (collections that register no block types), and leave the result in its cache so that later lookups do
    not load them either. No-op where the cache is already filled. Returns the names loaded."""
    from importlib.metadata import entry_points

    from prefect._internal.plugins import collections as plugins

    if plugins._collections is not None:
        return []
    eps = [ep for ep in entry_points(group="prefect.collections") if (ep.name or ep.value) not in names]
    plugins._collections = plugins.safe_load_entrypoints(eps)
    return sorted(plugins._collections)


# ------------------------------------------------------------------------------------------- process pools
def process_pool_runner_class() -> type:
    from prefect.task_runners import ProcessPoolTaskRunner

    return ProcessPoolTaskRunner


def pool_max_workers(runner: Any) -> int:
    return int(runner._max_workers)


def start_pool_executor(mp_context: Any, max_workers: int, initializer: Callable[..., None] | None,
                        initargs: tuple = ()) -> tuple[Any, Any]:
    """(message queue, ProcessPoolExecutor) whose workers run Prefect's own worker set-up (forwarding logs and
    events to ``queue``), then ``initializer(*initargs)``: the pool ``ProcessPoolTaskRunner.__enter__`` makes."""
    from concurrent.futures import ProcessPoolExecutor

    from prefect.task_runners import _initialize_process_pool_worker

    queue = mp_context.Queue()
    executor = ProcessPoolExecutor(max_workers=max_workers, mp_context=mp_context,
                                   initializer=_initialize_process_pool_worker,
                                   initargs=(queue, initializer, tuple(initargs)))
    return queue, executor


def enter_with_pool(runner: Any, queue: Any, executor: Any) -> Any:
    """Start ``runner`` (a ProcessPoolTaskRunner) on a pool from ``start_pool_executor`` instead of a new one."""
    from concurrent.futures import ThreadPoolExecutor

    from prefect.task_runners import TaskRunner

    TaskRunner.__enter__(runner)
    runner._subprocess_message_queue = queue
    runner._message_forwarding_thread = threading.Thread(
        target=runner._forward_subprocess_messages, name="ProcessPoolTaskRunnerMessageForwarder", daemon=True)
    runner._message_forwarding_thread.start()
    runner._executor = executor
    runner._resolver_executor = ThreadPoolExecutor(max_workers=runner._max_workers)
    return runner
