"""A build's first shards, generated while the local Prefect API starts.

``pairforge build`` on the embedded defaults starts Prefect's API server in a process of its own: several seconds of
one core (mostly Prefect's server imports) before a flow run can exist. The build's pool workers are forked
meanwhile; instead of waiting for the flow run, they start on the shards at once:

* the CLI opens the staging area (the same one the flow opens: it is keyed by spec hash and code version) and
  submits one head-start job per worker to the pool the flow will use;
* a job claims the next shard without a marker (an exclusive file in a private folder, under a lock) and commits it
  with the lane's own code (``flows.compute.commit_shard``, handed in by the CLI: same seeds, same files, marker
  last), until it is told to stop;
* the flow run, once it exists, takes over (``take``): under the same lock it stops the head start's claiming and
  reads which shards were claimed. The lanes (Prefect task runs) then share every other unfinished shard through
  the same claims (``claim_shard``): each lane gets the whole list and takes the next shard no one has claimed, so
  a worker still finishing its head-start shard does not leave the other with a longer fixed share. The flow waits
  for the claimed shards with its lanes, reports them as this run's shards and logs which they were.

Nothing about resume or retries changes: a claimed shard either gets its marker or not; one that failed (the job
records the error and stops claiming) or that was cut short has no marker and the flow redoes it as a task run
(with retries), as it redoes any shard whose marker is missing. Progress events (``plan``, ``shard``) start with the
head start, so the first progress line comes while the API is still starting.
"""
from __future__ import annotations

import contextlib
import fcntl
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

POLL_S = 1.0  # how often the head start looks for newly committed shards (progress events)
_STOP = "stop"
_LOCK = "lock"

_active: dict[str, "HeadStart"] = {}
_active_lock = threading.Lock()


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with open(folder / _LOCK, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _claim(folder: Path, todo: list[tuple[int, int, int]]) -> tuple[int, int, int] | None:
    """The next unclaimed shard of ``todo``, now claimed; None once the flow has taken over or all are claimed."""
    with _locked(folder):
        if (folder / _STOP).exists():
            return None
        return next((shard for shard in todo if _take(folder, shard[0])), None)


def _take(folder: Path, i: int) -> bool:
    """Claim shard ``i`` (the caller holds the lock); False if it is claimed already."""
    claim = folder / str(i)
    if claim.exists():
        return False
    claim.touch()
    return True


def claim_shard(folder: str, i: int) -> bool:
    """Claim shard ``i`` for a lane (after the take-over the lanes share the rest this way); False if taken."""
    where = Path(folder)
    with _locked(where):
        return _take(where, i)


def release_shard(folder: str, i: int) -> None:
    """Give a claim back (the shard failed): a retry claims it again."""
    where = Path(folder)
    with contextlib.suppress(FileNotFoundError), _locked(where):
        (where / str(i)).unlink()


def run_jobs(commit: Callable[..., dict[str, Any]], spec: Any, staging: Any, todo: list[tuple[int, int, int]],
             folder: str) -> list[dict[str, Any]]:
    """One worker's head start: claim and ``commit(spec, staging, i, start, stop)`` shards until told to stop (the
    lanes' own ``flows.compute.commit_shard``). An error ends this worker's head start and is returned with its shard
    (which has no marker: the flow redoes it as a task run)."""
    out: list[dict[str, Any]] = []
    where = Path(folder)
    while (shard := _claim(where, todo)) is not None:
        i, start, stop = shard
        try:
            out.append(commit(spec, staging, i, start, stop))
        except Exception as e:  # noqa: BLE001  (reported to the flow, which redoes the shard with retries)
            out.append({"shard": i, "error": f"{type(e).__name__}: {e}"})
            break
    return out


def plan_events(staging: Any, shards: list[range], finished: set[int]) -> list[dict[str, Any]]:
    """A build's first progress events: the plan, then one ``shard`` event per shard staged before this run (the
    flow sends them, or the head start when it began the build)."""
    plan = {"event": "plan", "name": staging.name, "version": staging.version, "shards": len(shards),
            "samples": sum(len(r) for r in shards), "finished": len(finished)}
    return [plan] + [{"event": "shard", "shard": i, "n": len(shards[i]), "reused": True, "seconds": 0.0}
                     for i in sorted(finished)]


def remove_folders() -> None:
    """Remove the claims folders of this process's head starts (an interrupt's last step; no waiting)."""
    with _active_lock:
        running = list(_active.values())
    for hs in running:
        shutil.rmtree(hs.folder, ignore_errors=True)


def _key(staging: Any) -> str:
    return str(staging.staging_dir)


class HeadStart:
    """The head start of one build: its jobs (futures of the pool's executor), the shards staged before it began
    (``finished``), and the shards it reported as committed (``reported``)."""

    def __init__(self, executor: Any, workers: int, spec: Any, staging: Any, shards: list[range],
                 commit: Callable[..., dict[str, Any]], emit: Callable[[dict[str, Any]], None] | None = None):
        self.staging, self.shards, self._emit = staging, shards, emit
        self.finished = set(staging.finished_shards())
        self.reported: set[int] = set()
        self.claimed: set[int] | None = None
        self.folder = Path(tempfile.mkdtemp(prefix="pairforge-head-start-"))
        self._heartbeat = staging.heartbeat()  # `pairforge gc` leaves this staging area alone from now on
        self._announce()
        todo = [(i, r.start, r.stop) for i, r in enumerate(shards) if i not in self.finished]
        self.futures = [executor.submit(run_jobs, commit, spec, staging, todo, str(self.folder))
                        for _ in range(min(workers, len(todo)))]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="head-start-progress", daemon=True)
        self._thread.start()
        with _active_lock:
            _active[_key(staging)] = self

    def _announce(self) -> None:
        if self._emit is not None:
            for ev in plan_events(self.staging, self.shards, self.finished):
                self._emit(ev)

    def _report_new(self) -> None:
        with contextlib.suppress(Exception):
            new = sorted(set(self.staging.finished_shards()) - self.finished - self.reported)
            for i in new:
                self.reported.add(i)
                if self._emit is not None:
                    self._emit({"event": "shard", "shard": i, "n": len(self.shards[i]), "reused": False})

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            self._report_new()

    def take_over(self) -> set[int]:
        """Stop claiming (running jobs finish the shard they hold) and stop reporting; the claimed shards."""
        if self.claimed is None:
            with _locked(self.folder):
                (self.folder / _STOP).touch()
                self.claimed = {int(p.name) for p in self.folder.iterdir() if p.name.isdigit()}
            self._stop.set()
            self._thread.join()
            self._report_new()
        return set(self.claimed)

    def close(self) -> None:
        """Stop (if the flow never took over) and clean up; the jobs' futures stay with the pool."""
        with contextlib.suppress(FileNotFoundError):
            self.take_over()
        self._heartbeat.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
        with _active_lock:
            if _active.get(_key(self.staging)) is self:
                del _active[_key(self.staging)]


def begin(runner: Any, spec: Any, staging: Any, shards: list[range], commit: Callable[..., dict[str, Any]],
          emit: Callable[[dict[str, Any]], None] | None = None) -> HeadStart | None:
    """Start a head start on ``runner``'s prestarted pool (None when it has none: a Dask or thread runner)."""
    pool = getattr(runner, "prestarted_executor", lambda: None)()
    if pool is None:
        return None
    executor, workers = pool
    return HeadStart(executor, workers, spec, staging, shards, commit, emit)


def take(staging: Any) -> HeadStart | None:
    """The head start of this staging area, if this process began one (the flow run takes it over)."""
    with _active_lock:
        return _active.get(_key(staging))


def close_all() -> None:
    with _active_lock:
        running = list(_active.values())
    for hs in running:
        hs.close()
