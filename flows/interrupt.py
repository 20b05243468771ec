"""Stopping ``pairforge build`` on the first Ctrl-C (SIGINT) or SIGTERM: workers first, then the local Prefect API,
then the staging writes of this process; one closing line says what was finished; exit 128 + the signal's number
(130 for SIGINT, 143 for SIGTERM).

The stop does not go through Prefect's engine (which, with its API gone, retried for a minute and then reported a
connection error). The handler runs in the main thread, where the flow, its direct task runs (publish, the card)
and every staging write of this process run: while it runs, none of them can move, and the process ends with
``os._exit`` from inside it. Shard workers write each file under a temporary name and rename it, and a shard's
commit marker last, so killing them loses at most the shard in progress; its temporary files are removed here.

Publish is decided by one fact the handler reads while the main thread is paused: whether the version's
``manifest.json`` exists (on a local disk it appears with the single rename that publishes the version). If it
does, the version is complete and the line says "published"; if not, nothing is visible and a rerun publishes from
the staged shards. The exit code is 130/143 in both cases: the command was interrupted; the line says the outcome.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
API_PHASE = "starting the local Prefect API"


class _State:
    owner_pid: int | None = None
    label: str = "build"
    phase: str = "starting"
    services: list[subprocess.Popen] = []
    staging: Any = None
    flow_run_id: str | None = None
    stopping: bool = False
    json_events: bool = False  # --json: the outcome also as a JSON line on stdout


_state = _State()


@contextlib.contextmanager
def handling(label: str = "build") -> Iterator[None]:
    """The first SIGINT/SIGTERM stops the build while this context is open (main thread only); the previous
    handlers come back afterwards (the CLI may run inside another program, e.g. a test runner)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    install(label)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _state.owner_pid, _state.staging, _state.services = None, None, []


def install(label: str = "build") -> None:
    """Take over SIGINT and SIGTERM for this process (the main thread): the first one stops the build."""
    _state.owner_pid = os.getpid()
    _state.label = label
    _state.phase = API_PHASE
    _state.services, _state.staging, _state.flow_run_id, _state.stopping = [], None, None, False
    _state.json_events = False
    reinstall()


def reinstall() -> None:
    """Put the handlers back (Prefect's flow engine swaps in its own SIGTERM handler for the length of a flow run)."""
    if _state.owner_pid != os.getpid() or threading.current_thread() is not threading.main_thread():
        return
    for s in SIGNALS:
        signal.signal(s, _on_signal)


def installed() -> bool:
    return _state.owner_pid == os.getpid()


def json_events(on: bool = True) -> None:
    _state.json_events = on


def stopping() -> bool:
    """Whether this process is stopping on a signal (its workers are being killed, it exits in a moment)."""
    return _state.stopping


def set_phase(phase: str) -> None:
    _state.phase = phase


def register_service(process: subprocess.Popen) -> None:
    """A process to stop after the workers (the local API server): it is not killed with the workers."""
    _state.services.append(process)


def unregister_service(process: subprocess.Popen) -> None:
    if process in _state.services:
        _state.services.remove(process)


def track_build(staging: Any, flow_run_id: str | None) -> None:
    """The build in progress, for the closing line (what is staged, whether it was published)."""
    _state.staging, _state.flow_run_id = staging, flow_run_id
    reinstall()


def hold(phase: str) -> None:
    """Testing hook: ``PAIRFORGE_TEST_HOLD="shard=1.5,card=3"`` makes a phase last that many seconds longer, so
    that tests can interrupt a build at a chosen point. Unset (always, outside tests) it does nothing."""
    spec = os.environ.get("PAIRFORGE_TEST_HOLD")
    if not spec:
        return
    for item in spec.split(","):
        name, _, seconds = item.partition("=")
        if name.strip() == phase:
            time.sleep(float(seconds or 0))


# ------------------------------------------------------------------------------------------------ the stop
def _on_signal(signum: int, frame: Any) -> None:
    if os.getpid() != _state.owner_pid:
        return  # a forked worker before its initializer ignored SIGINT: the build process stops it
    if _state.stopping:  # a second signal while stopping: no more waiting
        _kill(_descendants(), signal.SIGKILL)
        os._exit(128 + signum)
    _state.stopping = True
    try:
        # Prefect times waits in the main thread with SIGALRM (its alarm raises CancelledError wherever the main
        # thread is): this process is ending, so no alarm may cut the stop short.
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_IGN)
        stop(signum)
    except BaseException as e:  # the stop itself failed: still one line, still the signal's exit code
        if os.environ.get("PAIRFORGE_DEBUG_STOP"):
            import traceback

            traceback.print_exc()
        _write_line(f"interrupted ({signal.Signals(signum).name}); reporting what was finished failed "
                    f"({type(e).__name__}: {e}); rerun the same command to resume")
    finally:
        os._exit(128 + signum)


def stop(signum: int) -> None:
    """Workers, then the API (after recording the flow run as crashed), then this process's staging writes; then the
    closing line on stderr."""
    services = {p.pid for p in _state.services if p.poll() is None}
    workers = [pid for pid in _descendants(exclude=services)]
    _kill(workers, signal.SIGKILL)
    _mark_flow_run(signum)
    for p in list(_state.services):
        _terminate(p)
    _kill(_descendants(), signal.SIGKILL)  # anything a service left behind
    _remove_partial_files()
    line = outcome(signum)
    if _state.json_events:
        import json

        st = _state.staging
        event = {"event": "interrupted", "signal": signal.Signals(signum).name, "exit_code": 128 + signum,
                 "published": bool(st is not None and _published(st)), "message": line}
        if st is not None:
            event.update(name=st.name, version=st.version)
        try:
            sys.stdout.flush()
            os.write(1, (json.dumps(event) + "\n").encode())
        except (OSError, ValueError):
            pass
    _write_line(line)


def outcome(signum: int) -> str:
    name = signal.Signals(signum).name
    st = _state.staging
    if st is None:
        return (f"interrupted ({name}) while {_state.phase}: no shard was built and nothing was published; "
                "rerun the same command to build")
    ref = f"{st.name}@v{st.version}"
    if _published(st):
        return f"interrupted ({name}) after publishing: {ref} is published and complete; nothing to resume"
    n_shards = len(st.shards)
    try:
        done = sorted(st.finished_shards())
    except Exception:
        done = []
    samples = sum(len(st.shards[i]) for i in done if 0 <= i < n_shards)
    total = sum(len(r) for r in st.shards)
    where = " (publishing had started; the version was not made visible)" if _state.phase == "publishing" else ""
    when = f" while {API_PHASE}" if _state.phase == API_PHASE else ""  # shards begun while the API started
    return (f"interrupted ({name}){when}: {len(done)} of {n_shards} shards of {ref} finished ({samples} of {total} samples)"
            f"{where}; nothing was published; rerun the same command to resume")


def _published(st: Any) -> bool:
    try:
        st.root.refresh()
        return bool(st.root.exists(f"{st.version_dir}/manifest.json"))
    except Exception:
        return False


def _mark_flow_run(signum: int) -> None:
    """Record the flow run as crashed while the API still answers (at most ~2 s; skipped when it does not)."""
    run_id = _state.flow_run_id
    if not run_id or "prefect" not in sys.modules:
        return

    def report() -> None:
        try:
            from prefect.client.orchestration import get_client
            from prefect.states import Crashed

            with get_client(sync_client=True) as client:
                client.set_flow_run_state(run_id, Crashed(message=f"interrupted by {signal.Signals(signum).name}"),
                                          force=True)
        except Exception:
            pass

    t = threading.Thread(target=report, name="report-interrupt", daemon=True)
    t.start()
    t.join(2.0)


def _terminate(p: subprocess.Popen, grace: float = 3.0) -> None:
    if p.poll() is not None:
        return
    try:
        p.terminate()
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    except OSError:
        pass


def _remove_partial_files() -> None:
    """Temporary files of writes cut short (``<name>.tmp-<pid>-<thread>``) in the staging folder of a local root,
    and a head start's claims folder (flows.head_start)."""
    head_start = sys.modules.get("flows.head_start")
    if head_start is not None:
        head_start.remove_folders()
    st = _state.staging
    if st is None or not getattr(st.root, "local", False):
        return
    for base, _dirs, files in os.walk(st.staging_dir):
        for f in files:
            if ".tmp-" in f:
                try:
                    os.remove(os.path.join(base, f))
                except OSError:
                    pass


def _write_line(text: str) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    prefix = ""
    try:
        if os.isatty(1):  # a progress bar holds the line and hides the cursor: end its line, show the cursor
            os.write(1, b"\x1b[?25h\n")
        elif os.isatty(2):
            prefix = "\n"
    except OSError:
        pass
    try:
        os.write(2, (prefix + text + "\n").encode())
    except OSError:
        pass


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    if os.path.isdir("/proc"):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read().decode(errors="replace")
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
        return kids
    try:
        import psutil

        for p in psutil.process_iter(["pid", "ppid"]):
            kids.setdefault(p.info["ppid"], []).append(p.info["pid"])
    except Exception:
        import multiprocessing

        kids[os.getpid()] = [p.pid for p in multiprocessing.active_children() if p.pid]
    return kids


def _descendants(exclude: set[int] | None = None) -> list[int]:
    """Every process this one started, and theirs, except the subtrees of ``exclude``; children first."""
    kids = _children_map()
    out, todo = [], list(kids.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        if exclude and pid in exclude:
            continue
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 2.0
    for pid in pids:  # reap our own children so nothing is left as a zombie either
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break  # not our child (a grandchild), or already reaped
            if done:
                break
            time.sleep(0.01)
