"""Prefect settings for pairforge: the embedded (ephemeral) API by default, telemetry off, quiet logs.

Import this module before ``prefect``: Prefect reads its settings from the environment at import time.
Values the user has set in the environment always win (``setdefault``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

# Defaults applied before Prefect is imported anywhere in the process.
PREFECT_DEFAULTS = {
    # No network here and no reason to phone home from a data pipeline.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The ephemeral SQLite server takes ~15 s to start on a slow 2-core machine; Prefect's default is tighter.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # The CLI prints its own summary; Prefect's per-task INFO lines would drown it.
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
}


def apply_defaults(verbose: bool = False) -> None:
    for k, v in PREFECT_DEFAULTS.items():
        os.environ.setdefault(k, v)
    if verbose:
        os.environ["PREFECT_LOGGING_LEVEL"] = "INFO"


apply_defaults()


class _DropShutdownNoise(logging.Filter):
    """The ephemeral server's shutdown logs asyncio CancelledError tracebacks (SQLAlchemy pool); they are noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__name__ == "CancelledError":
            return False
        msg = record.getMessage()
        return "CancelledError" not in msg


def silence_shutdown_noise() -> None:
    f = _DropShutdownNoise()
    for name in ("", "prefect", "prefect.server", "sqlalchemy", "sqlalchemy.pool", "uvicorn", "uvicorn.error",
                 "asyncio", "distributed", "prefect.events.clients", "prefect._internal"):
        logging.getLogger(name).addFilter(f)
    # Dask's local cluster logs every worker start/stop at INFO.
    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.core",
                 "distributed.http.proxy", "distributed.worker"):
        logging.getLogger(name).setLevel(logging.WARNING)


def api_url() -> str | None:
    """The Prefect API this process reports to, or None for the embedded ephemeral API."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@contextlib.contextmanager
def prefect_api(verbose: bool = False, services: bool = False) -> Iterator[str]:
    """Yield the API URL flows report to. With no ``PREFECT_API_URL``, start one local server (SQLite under
    ``PREFECT_HOME``) for this process and its workers; process pools and Dask workers inherit its URL, so every
    task run lands in the same database instead of each worker starting its own server.

    ``services=False`` starts it the way Prefect's ephemeral mode does (no background services: fastest start,
    enough for a build). ``pairforge serve`` needs ``services=True``: the scheduler service is what turns a
    deployment's cron into scheduled runs, and ephemeral mode does not run it.
    """
    url = api_url()
    if url:
        yield url
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    log_path = Path(PREFECT_HOME.value()) / "local-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)

    class _LocalServer(SubprocessASGIServer):
        """Prefect's own server command; output to a log file unless --verbose, services on request."""

        def _run_uvicorn_command(self) -> subprocess.Popen:
            from prefect.settings import get_current_settings

            env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_FINAL": "1",
                   **get_current_settings().to_environment_variables(exclude_unset=True)}
            if not services:
                env["PREFECT__SERVER_EPHEMERAL"] = "1"
            out = None if verbose else open(log_path, "ab")
            # No --app-dir (Prefect passes its site-packages, which would shadow PYTHONPATH): the server imports
            # exactly what this process imports.
            return subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                 "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env=env, stdout=out, stderr=out)

    prior = SubprocessASGIServer._instances.get(None)
    server = _LocalServer(port=None)
    # Registered as the default instance so Prefect's internals reuse it rather than spawning another.
    SubprocessASGIServer._instances[None] = server
    if not verbose:
        logging.getLogger("prefect.server.api.server").setLevel(logging.WARNING)
    server.start()
    old_env = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        _drain_prefect_workers()
        if old_env is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = old_env
        server.stop()
        if prior is not None:
            SubprocessASGIServer._instances[None] = prior


def _drain_prefect_workers() -> None:
    """Flush Prefect's background log/event workers while the server still answers (avoids shutdown errors)."""
    with contextlib.suppress(Exception):
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
    with contextlib.suppress(Exception):
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=5)

