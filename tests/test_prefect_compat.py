"""Every Prefect internal that flows/prefect_compat.py relies on still exists in the installed Prefect, with the
parameters and attributes pairforge uses. A Prefect upgrade that breaks one fails here, naming it, instead of
somewhere inside a build."""
from __future__ import annotations

import importlib
import inspect
import multiprocessing
import threading

import pytest

from flows import prefect_compat as compat


def _prefect_version() -> str:
    import prefect

    return prefect.__version__


def _private(module: str, name: str) -> object:
    """``module.name`` (dotted attribute path), or a failure naming the private API and the Prefect version."""
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"Prefect {_prefect_version()}: module {module} (used by flows/prefect_compat.py) is gone: {e}")
    for part in name.split("."):
        if not hasattr(obj, part):
            pytest.fail(f"Prefect {_prefect_version()} has no {module}.{name} (private API used by "
                        f"flows/prefect_compat.py): adapt that module")
        obj = getattr(obj, part)
    return obj


def _has_params(fn: object, where: str, *names: str) -> None:
    params = inspect.signature(fn).parameters
    missing = [n for n in names if n not in params]
    assert not missing, (f"Prefect {_prefect_version()}: {where} no longer takes {', '.join(missing)} "
                         f"(private API used by flows/prefect_compat.py); its parameters are now {list(params)}")


def test_every_private_api_in_the_table_has_a_check_below():
    checked = {"_initialize_process_pool_worker", "ProcessPoolTaskRunner._forward_subprocess_messages",
               "ProcessPoolTaskRunner." + "/".join(compat.POOL_ATTRIBUTES), "TaskRunner.__enter__",
               "refresh_global_settings_context", "Settings.to_environment_variables(exclude_unset=)",
               f"create_app(ephemeral=, final=) reading {compat.SERVER_EPHEMERAL_ENV}/{compat.SERVER_FINAL_ENV}",
               "APILogWorker.drain_all(timeout=)", "EventsWorker.drain_all(timeout=)",
               "_collections/safe_load_entrypoints"}
    assert {name for _, name, _ in compat.PRIVATE_APIS} == checked


def test_process_pool_worker_initializer_takes_queue_initializer_and_initargs():
    fn = _private("prefect.task_runners", "_initialize_process_pool_worker")
    assert callable(fn)
    _has_params(fn, "prefect.task_runners._initialize_process_pool_worker", "message_queue", "initializer",
                "initargs")
    # Positional order matters: start_pool_executor passes (queue, initializer, initargs).
    assert list(inspect.signature(fn).parameters)[:3] == ["message_queue", "initializer", "initargs"], \
        "prefect.task_runners._initialize_process_pool_worker changed its parameter order"


def test_process_pool_runner_has_the_state_a_prestarted_pool_sets():
    cls = _private("prefect.task_runners", "ProcessPoolTaskRunner")
    assert cls is compat.process_pool_runner_class()
    _has_params(cls.__init__, "ProcessPoolTaskRunner()", "max_workers", "initializer", "initargs")
    assert callable(_private("prefect.task_runners", "ProcessPoolTaskRunner._forward_subprocess_messages"))
    runner = cls(max_workers=3)
    missing = [a for a in compat.POOL_ATTRIBUTES if not hasattr(runner, a)]
    assert not missing, (f"Prefect {_prefect_version()}: ProcessPoolTaskRunner has no {', '.join(missing)} "
                         "(private attributes set by flows/prefect_compat.enter_with_pool)")
    assert compat.pool_max_workers(runner) == 3
    # ProcessPoolTaskRunner.__enter__ still sets exactly the attributes enter_with_pool sets.
    src = inspect.getsource(cls.__enter__)
    for attr in compat.POOL_ATTRIBUTES[1:]:
        assert f"self.{attr} =" in src, (f"Prefect {_prefect_version()}: ProcessPoolTaskRunner.__enter__ no "
                                         f"longer sets {attr}; flows/prefect_compat.enter_with_pool copies it")
    assert callable(_private("prefect.task_runners", "TaskRunner.__enter__"))


def test_a_prestarted_pool_runs_a_task_function_and_forwards_like_prefects_own():
    """The real thing, end to end without a flow: a pool from start_pool_executor, adopted by a runner."""
    cls = compat.process_pool_runner_class()
    runner = cls(max_workers=1)
    ctx = multiprocessing.get_context("spawn")
    queue, executor = compat.start_pool_executor(ctx, 1, None, ())
    try:
        compat.enter_with_pool(runner, queue, executor)
        assert runner._started and runner._executor is executor
        assert isinstance(runner._message_forwarding_thread, threading.Thread)
        assert runner._message_forwarding_thread.is_alive()
        assert executor.submit(pow, 3, 4).result(timeout=120) == 81
    finally:
        runner.__exit__(None, None, None)
    assert runner._executor is None and not runner._started


def test_settings_context_refresh_and_environment_export_exist():
    fn = _private("prefect.context", "refresh_global_settings_context")
    assert callable(fn) and not [p for p in inspect.signature(fn).parameters.values() if p.default is p.empty]
    settings_cls = _private("prefect.settings", "Settings")
    _has_params(settings_cls.to_environment_variables, "Settings.to_environment_variables", "exclude_unset")
    env = compat.settings_environment()
    assert isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    compat.refresh_settings_context()


def test_server_app_factory_reads_the_private_environment_variables():
    module, _, name = compat.PREFECT_APP_FACTORY.partition(":")
    create_app = _private(module, name)
    _has_params(create_app, compat.PREFECT_APP_FACTORY, "ephemeral", "final")
    src = inspect.getsource(create_app)
    for var in (compat.SERVER_EPHEMERAL_ENV, compat.SERVER_FINAL_ENV):
        assert var in src, (f"Prefect {_prefect_version()}: {compat.PREFECT_APP_FACTORY} no longer reads {var} "
                            "(private environment variable set by flows/settings.LocalServer)")
    # pairforge's factory (what LocalServer runs) hands its arguments to Prefect's.
    module, _, name = compat.SERVER_APP_FACTORY.partition(":")
    ours = getattr(importlib.import_module(module), name)
    assert "load_collections_except" in inspect.getsource(ours)


def _fresh_python(code: str) -> dict:
    """Run ``code`` in a new interpreter (Prefect's collection cache and sys.modules untouched by other tests); it
    prints one JSON object."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_collections_cache_is_filled_without_the_blockless_integrations():
    _private("prefect._internal.plugins.collections", "_collections")
    assert callable(_private("prefect._internal.plugins.collections", "safe_load_entrypoints"))
    got = _fresh_python(
        "import json, sys\n"
        "from flows import prefect_compat as compat\n"
        "from flows.runners import init_pool_worker\n"
        "init_pool_worker(())\n"  # what every local pool worker runs first
        "from prefect.plugins import load_prefect_collections\n"
        "from prefect.blocks.core import Block\n"
        "from prefect.filesystems import LocalFileSystem\n"
        "cls = Block.get_block_class_from_key('local-file-system')\n"  # what hydrating a task run's context does
        "print(json.dumps({'cached': sorted(load_prefect_collections()), 'again': compat.load_collections_except(),\n"
        "                  'found': cls is LocalFileSystem,\n"
        "                  'imported': sorted(m for m in ('ray', 'distributed', 'prefect_ray', 'prefect_dask')\n"
        "                                     if m in sys.modules)}))\n")
    assert got["found"] and got["again"] == []
    assert not set(got["cached"]) & compat.BLOCKLESS_COLLECTIONS
    assert got["imported"] == []


def test_the_blockless_integrations_register_no_block_types():
    """The reason they may be skipped: loading them (when installed) adds no block class to Prefect's registry."""
    got = _fresh_python(
        "import json\n"
        "from importlib.metadata import entry_points\n"
        "from prefect.blocks.core import Block\n"
        "from prefect.utilities.dispatch import get_registry_for_type\n"
        "from flows import prefect_compat as compat\n"
        "before = set(get_registry_for_type(Block))\n"
        "eps = [e for e in entry_points(group='prefect.collections') if e.name in compat.BLOCKLESS_COLLECTIONS]\n"
        "for e in eps:\n"
        "    e.load()\n"
        "print(json.dumps({'loaded': sorted(e.name for e in eps),\n"
        "                  'new': sorted(set(get_registry_for_type(Block)) - before)}))\n")
    assert got["new"] == [], f"{got['loaded']} now register block types {got['new']}: take them out of " \
                             "prefect_compat.BLOCKLESS_COLLECTIONS"


def test_background_workers_still_drain_with_a_timeout():
    for module, name in (("prefect.logging.handlers", "APILogWorker.drain_all"),
                         ("prefect.events.worker", "EventsWorker.drain_all")):
        _has_params(_private(module, name), f"{module}.{name}", "timeout")
    compat.drain_background_workers(timeout=1)  # nothing queued: returns at once


def test_a_missing_private_api_fails_naming_it():
    with pytest.raises(pytest.fail.Exception, match=r"has no prefect\.task_runners\._gone_in_a_future_prefect "
                                                    r"\(private API used by flows/prefect_compat\.py\)"):
        _private("prefect.task_runners", "_gone_in_a_future_prefect")
    with pytest.raises(AssertionError, match=r"no longer takes message_queue"):
        _has_params(lambda queue, initializer, initargs: None, "stand-in", "message_queue")
