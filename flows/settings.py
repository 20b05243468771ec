"""Prefect settings for pairforge: the embedded (ephemeral) API by default, telemetry off, quiet logs.

Import this module before ``prefect``: Prefect reads its settings from the environment at import time.
Values the user has set in the environment always win (``setdefault``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from flows import prefect_compat as compat

# Defaults applied before Prefect is imported anywhere in the process.
PREFECT_DEFAULTS = {
    # No network here and no reason to phone home from a data pipeline.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The client's usage data too, and with it the "Prefect collects anonymous usage data" notice of a first run.
    "DO_NOT_TRACK": "1",
    # The ephemeral SQLite server takes ~15 s to start on a slow 2-core machine; Prefect's default is tighter.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # The CLI prints its own summary; Prefect's per-task INFO lines would drown it.
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    # ... but the runs' own INFO lines (a lane's line per shard, the flow's head-start line, state changes) still go
    # to the API, where the Prefect UI shows them with the run: INFO for the run loggers (whose handler is the API),
    # WARNING for the console handler they propagate to.
    "PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL": "INFO",
    "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "INFO",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
}


def apply_defaults(verbose: bool = False) -> None:
    for k, v in PREFECT_DEFAULTS.items():
        os.environ.setdefault(k, v)
    if verbose:
        os.environ["PREFECT_LOGGING_LEVEL"] = "INFO"
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "INFO"


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


def die_with_parent(sig: int | None = None) -> None:
    """Linux: ask the kernel to send ``sig`` (default SIGTERM) to this process when the process (thread) that
    started it dies, even by SIGKILL, so nothing pairforge starts outlives it. Elsewhere a no-op."""
    fn = _pdeathsig_setter(sig)
    if fn is not None:
        fn()


def _pdeathsig_setter(sig: int | None = None) -> Callable[[], None] | None:
    """A function that sets the parent-death signal, with libc loaded now: usable as a ``preexec_fn``, which runs
    between fork and exec where importing or loading a library could deadlock on a lock another thread held."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        import signal

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
        value = int(sig or signal.SIGTERM)
    except Exception:
        return None
    return lambda: prctl(1, value)  # PR_SET_PDEATHSIG


class LocalServer:
    """Prefect's own API server (``uvicorn prefect.server.api.server:create_app``) on a free local port, SQLite under
    ``PREFECT_HOME``: what Prefect's ephemeral mode runs, started without importing Prefect's server package here.

    That import costs ~2 s in the calling process and ephemeral mode does it before launching the server, which
    then imports the same modules again (~3 s). ``start()`` only launches the process; the caller does its own
    imports while the server starts, and ``wait()`` blocks until ``/api/health`` answers.
    ``services=True`` runs Prefect's background services (the scheduler turns a deployment's cron into runs).
    """

    def __init__(self, verbose: bool = False, services: bool = False, log_path: Path | None = None):
        self.verbose, self.services, self.log_path = verbose, services, log_path
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._log = None
        self._creating: Path | None = None  # the fresh-database marker this server wrote (``_fresh_database``)
        self._failed_starts = 0
        self._log_offset = 0
        self._env: dict[str, str] = {}

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @staticmethod
    def _free_port() -> int:
        import socket

        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def start(self) -> "LocalServer":
        self.port = self._free_port()
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", compat.SERVER_FINAL_ENV: "1"}
        if "prefect.settings" in sys.modules:  # settings set in this process (profiles, temporary_settings) carry over
            env.update(compat.settings_environment())
        self._creating = _fresh_database(self._creating, env)
        self._env = env
        env.pop("PREFECT_API_URL", None)
        if not self.services:
            env[compat.SERVER_EPHEMERAL_ENV] = "1"
        if self._log is not None:  # a restart on another port
            self._log.close()
            self._log = None
        if self.verbose or self.log_path is None:
            out = None
        else:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = self._log = open(self.log_path, "ab")
            self._log_offset = out.tell()  # what this start appends is read on a failure (_startup_failure)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", compat.SERVER_APP_FACTORY, "--host",
             "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C reaches the build, which stops the server after its workers.
            start_new_session=True, preexec_fn=_pdeathsig_setter())
        if self._creating is not None:  # the server's pid: a later start can tell whether it is still creating it
            self._creating.write_text(f"{os.getpid()} {self.process.pid}\n")
        from flows import interrupt

        interrupt.register_service(self.process)
        return self

    def wait(self, timeout: float | None = None) -> str:
        """Block until the API answers; restart on another port if this one was taken meanwhile."""
        import urllib.error
        import urllib.request

        limit = float(timeout or os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 120)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            code = self.process.poll()
            failed = _startup_failure(self.log_path, self._log_offset) if code == 3 else None
            if code == 3 and failed is None and self._failed_starts < 5:  # uvicorn: address already in use
                self._failed_starts += 1
                self.start()
                continue
            if code is not None:
                self.stop()
                raise RuntimeError(f"the local Prefect API server exited with code {code} while starting"
                                   f"{': ' + failed if failed else ''}; see {self.log_path or 'its output above'}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        _database_ready(self._creating, self._env)  # complete: nothing to redo next time
                        self._creating = None
                        return self.api_url
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the local Prefect API server did not answer within {limit:.0f} s "
                           "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")

    def stop(self) -> None:
        if self.process is not None:
            from flows import interrupt

            interrupt.unregister_service(self.process)
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None


def _prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


CREATING_SUFFIX = ".pairforge-creating"


def _creating_marker(db: Path) -> Path:
    """The fresh-database marker next to ``db`` (``_fresh_database``)."""
    return db.with_name(db.name + CREATING_SUFFIX)


def _default_database(env: dict[str, str]) -> Path | None:
    """The local server's SQLite file when it is Prefect's default (``PREFECT_HOME/prefect.db``); None when the
    server's environment ``env`` or the profiles file names a database of its own (never touched here)."""
    if any("DATABASE" in k for k in env if k.startswith("PREFECT_")):
        return None
    home = Path(env.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    try:
        if "DATABASE" in (home / "profiles.toml").read_text(encoding="utf-8"):
            return None
    except OSError:
        pass
    return home / "prefect.db"


def _fresh_database(own: Path | None, env: dict[str, str]) -> Path | None:
    """A local server that creates Prefect's default database writes a marker next to it until it first answers.
    Prefect's SQLite migrations are not atomic: a server killed while it creates the database (a build stopped in its
    first seconds on a new machine) leaves one that every later start fails to migrate ("index ... already exists").
    Such a database never answered a request, so it holds nothing: when the marker's processes are gone, the
    database and the marker are removed here and the next server creates it again. Returns the marker this start
    writes (None: the database exists, or is not Prefect's default, or another live server is creating it).
    ``env``: the server's environment."""
    db = _default_database(env)
    if db is None:
        return None
    marker = _creating_marker(db)
    if marker.exists() and marker != own:
        try:
            pids = [int(x) for x in marker.read_text().split()]
        except (OSError, ValueError):
            pids = []
        from store.build import pid_alive

        if any(pid_alive(p) for p in pids if p != os.getpid()):
            return None  # another build's server is creating it now
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                db.with_name(db.name + suffix).unlink()
        marker.unlink(missing_ok=True)
    if marker == own or not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{os.getpid()}\n")
        return marker
    return None


def _database_ready(own: Path | None, env: dict[str, str]) -> None:
    """A server answered: the database is complete; remove the fresh-database marker (this server's or another's)."""
    db = _default_database(env)
    marker = own if own is not None else (_creating_marker(db) if db is not None else None)
    if marker is not None:
        marker.unlink(missing_ok=True)


def _startup_failure(log_path: Path | None, offset: int = 0) -> str | None:
    """The error that made the server's start-up fail, from what it appended to its log after ``offset`` (None: no
    such failure logged, e.g. the port was taken)."""
    if log_path is None:
        return None
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(offset, f.tell() - 65536))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    if "Application startup failed" not in tail:
        return None
    tail = tail[:tail.rindex("Application startup failed")]
    errors = [ln.strip() for ln in tail.splitlines() if re.match(r"^[\w.]+(Error|Exception)\b.*:", ln.strip())]
    return errors[-1][:300] if errors else "its application start-up failed"


LOOPBACK_CA_ENV = "PREFECT_API_SSL_CERT_FILE"
_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----\n.+?\n-----END CERTIFICATE-----\n", re.S)


def loopback_ca_file() -> str | None:
    """A CA file of one certificate, for Prefect's clients of the local server only.

    That server speaks plain HTTP on 127.0.0.1, so no certificate is ever checked; but Prefect's client builds a TLS
    context for every client it creates, loading the whole CA bundle it is given (certifi's, ~150 certificates: ~35
    ms of CPU each time on the 2-core build machine; one certificate: ~1 ms). A build creates about a dozen (the CLI's
    flow engine, log and event workers, each lane's worker). Written once under PREFECT_HOME (the first certificate
    of certifi's bundle); None where that cannot be done (Prefect's default then stands)."""
    path = _prefect_home() / "pairforge-loopback-ca.pem"
    try:
        if not path.is_file():
            import certifi

            m = _PEM_CERT.search(Path(certifi.where()).read_text())
            if m is None:
                return None
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(m.group(0))
            os.replace(tmp, path)
        return str(path)
    except (ImportError, OSError):
        return None


def _use_loopback_ca() -> bool:
    """Export ``loopback_ca_file()`` as PREFECT_API_SSL_CERT_FILE unless the user chose a CA file for Prefect's API
    (environment, profile or settings; Prefect's default, the system's SSL_CERT_FILE, is not a choice); True when
    exported (the caller removes it again)."""
    if os.environ.get(LOOPBACK_CA_ENV):
        return False
    from prefect.settings import PREFECT_API_SSL_CERT_FILE

    chosen = PREFECT_API_SSL_CERT_FILE.value()
    if chosen and chosen != os.environ.get("SSL_CERT_FILE"):
        return False
    ca = loopback_ca_file()
    if ca is None:
        return False
    os.environ[LOOPBACK_CA_ENV] = ca
    return True


def launch_local_server(verbose: bool = False) -> LocalServer | None:
    """Launch the local API server now (no wait) unless the environment names an API; ``prefect_api(server=)``
    then uses it (and stops it if Prefect's settings name an API after all). The caller stops it if it never gets
    there (``stop()`` is safe to call twice)."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    return LocalServer(verbose, False, _prefect_home() / "local-server.log").start()


@contextlib.contextmanager
def prefect_api(verbose: bool = False, services: bool = False,
                while_starting: Callable[[], None] | None = None,
                server: LocalServer | None = None) -> Iterator[str]:
    """Yield the API URL flows report to. With no ``PREFECT_API_URL`` (environment, profile or settings), start one
    local server for this process and its workers; process pools and Dask workers inherit its URL, so every task
    run lands in the same database instead of each worker starting its own server.

    The server is launched first and Prefect's settings are read while it starts; if they name an API after all,
    the launched server is stopped and that API is used. ``while_starting()`` runs while the server starts
    (imports, warming worker pools, a build's head start), or at once when an existing API is used.
    ``services=False`` starts it the way Prefect's ephemeral mode does (no background
    services: fastest start, enough for a build); ``pairforge serve`` needs ``services=True``: the scheduler service
    is what turns a deployment's cron into scheduled runs, and ephemeral mode does not run it. ``server``: one
    ``launch_local_server`` launched earlier (no services; used instead of launching another, stopped at the end all
    the same).
    """
    env_url = os.environ.get("PREFECT_API_URL")
    if env_url:
        if server is not None:
            server.stop()
        if while_starting is not None:
            while_starting()
        _hold_api()
        yield env_url
        return
    if server is None:
        server = LocalServer(verbose, services, _prefect_home() / "local-server.log").start()
    exported = loopback_ca = False
    try:
        configured = api_url()  # imports Prefect's settings (~1 s) while the server starts
        if configured:
            server.stop()
            if while_starting is not None:
                while_starting()
            _hold_api()
            yield configured
            return
        from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

        # Exported before the server answers, so that worker processes started meanwhile inherit it; and in the
        # process-global settings, for threads Prefect starts without this context (a process pool's message
        # forwarder), which would otherwise start servers of their own.
        os.environ["PREFECT_API_URL"] = server.api_url
        loopback_ca = _use_loopback_ca()
        compat.refresh_settings_context()
        exported = True
        if while_starting is not None:
            while_starting()
        _hold_api()
        url = server.wait()
        if os.environ.get("PREFECT_API_URL") != url:  # restarted on another port (the first was taken meanwhile)
            os.environ["PREFECT_API_URL"] = url
            compat.refresh_settings_context()
        # No flow-run heartbeats: they let a long-lived server notice crashed runs, and this server ends with this
        # process; their thread also costs up to 1 s at the end of every flow run.
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield url
    finally:
        if exported:
            _drain_prefect_workers()
            os.environ.pop("PREFECT_API_URL", None)
            if loopback_ca:
                os.environ.pop(LOOPBACK_CA_ENV, None)
            compat.refresh_settings_context()
        server.stop()


def _hold_api() -> None:
    """Testing hook (``PAIRFORGE_TEST_HOLD="api=8"``): the API takes that much longer to be reached, local or not."""
    from flows import interrupt

    interrupt.hold("api")


def _drain_prefect_workers() -> None:
    """Flush Prefect's background log/event workers while the server still answers (avoids shutdown errors)."""
    compat.drain_background_workers(timeout=5)

