"""Progress for people and scripts. ``EventChannel``: how a flow sends its events to the reporter its caller set.
Build progress, fed by the build flow's events (``plan``, ``shard``, ``publishing``, ``published``): a rich bar on a
terminal; plain lines (count, rate, ETA) when stdout is a pipe or a file (CI, nohup, ``| tee``); JSON lines
(``--json``); nothing (``--quiet``). Training progress (``start``, ``step``, ``checkpoint``): ``TrainBar``. Both bars
are ``RichBar``s.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import sys
import threading
import time
from typing import Any, Callable, Iterator, TextIO

ProgressFn = Callable[[dict[str, Any]], None]


_CHANNELS: dict[str, "EventChannel"] = {}


def channel(name: str) -> "EventChannel":
    """The process's channel of that name (made on first use): what a pickled channel becomes in a worker."""
    ch = _CHANNELS.get(name)
    return ch if ch is not None else EventChannel(name)


class EventChannel:
    """A flow's progress events go to the reporter set in the calling context (none: dropped). Context-local, so
    flows run side by side (threads, tests) each report to their own caller. Pickles by name (task runners ship
    task arguments to worker processes, where no reporter is set)."""

    def __init__(self, name: str):
        self.name = name
        self._fn: contextvars.ContextVar[ProgressFn | None] = contextvars.ContextVar(name, default=None)
        _CHANNELS.setdefault(name, self)

    def __reduce__(self):
        return channel, (self.name,)

    @contextlib.contextmanager
    def reporting_to(self, fn: ProgressFn) -> Iterator[None]:
        """Send the events to ``fn`` while the flow runs in this context."""
        token = self._fn.set(fn)
        try:
            yield
        finally:
            self._fn.reset(token)

    def get(self) -> ProgressFn | None:
        return self._fn.get()

    def emit(self, event: str, **data: Any) -> None:
        fn = self._fn.get()
        if fn is not None:
            fn({"event": event, **data})

MODES = ("auto", "bar", "lines", "json", "quiet")


def choose_mode(quiet: bool, as_json: bool, stream: TextIO | None = None) -> str:
    if as_json:
        return "json"
    if quiet:
        return "quiet"
    stream = stream or sys.stdout
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):
        return "lines"


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


class Tally:
    """Counts of a build: samples and shards done, samples/s over generated (not reused) samples, and an ETA."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.name, self.version = "", 0
        self.samples = self.shards = 0
        self.done = self.done_shards = self.generated = 0
        self.started = False

    def plan(self, ev: dict[str, Any]) -> None:
        self.t0 = time.perf_counter()
        self.name, self.version = ev["name"], ev["version"]
        self.samples, self.shards = int(ev["samples"]), int(ev["shards"])
        self.started = True

    def shard(self, ev: dict[str, Any]) -> None:
        if ev.get("redone"):  # a shard redone after a stale cache hit was already counted once
            return
        self.done_shards += 1
        self.done += int(ev["n"])
        if not ev.get("reused"):
            self.generated += int(ev["n"])

    @property
    def elapsed(self) -> float:
        return max(time.perf_counter() - self.t0, 1e-9)

    @property
    def rate(self) -> float:
        return self.generated / self.elapsed

    @property
    def eta_s(self) -> float | None:
        left = self.samples - self.done
        if left <= 0:
            return 0.0
        return left / self.rate if self.generated else None

    def as_dict(self) -> dict[str, Any]:
        eta = self.eta_s
        return {"done": self.done, "total": self.samples, "shards_done": self.done_shards, "shards": self.shards,
                "samples_per_s": round(self.rate, 3), "elapsed_s": round(self.elapsed, 2),
                "eta_s": None if eta is None else round(eta, 1)}


class LineProgress:
    """One plain line per finished shard (at most one every ``min_interval`` s, the last always) and a line every
    ``heartbeat`` s while no shard finishes, flushed at once: readable in a CI log or through ``tee``."""

    def __init__(self, stream: TextIO | None = None, min_interval: float = 2.0, heartbeat: float = 3.0):
        self.stream = stream or sys.stdout
        self.min_interval, self.heartbeat = min_interval, heartbeat
        self.tally = Tally()
        self.last = 0.0
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.finished = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        return False

    def _print(self, text: str) -> None:
        with self.lock:
            self.last = time.perf_counter()
            try:
                self.stream.write(text + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass

    def _status(self) -> str:
        t = self.tally
        rate = f"{t.rate:.1f} samples/s" if t.generated else "reused so far" if t.done else "first shards running"
        return (f"{t.done}/{t.samples} samples, {t.done_shards}/{t.shards} shards, {rate}, "
                f"{_eta(t.elapsed)} elapsed, ETA {_eta(t.eta_s)}")

    def _beat(self) -> None:
        while not self.stop_event.wait(1.0):
            if not self.finished and time.perf_counter() - self.last >= self.heartbeat:
                self._print(f"  ... {self._status()}")

    def __call__(self, ev: dict[str, Any]) -> None:
        kind = ev["event"]
        if kind == "plan":
            self.tally.plan(ev)
            resumed = f", {ev['finished']} already staged" if ev.get("finished") else ""
            self._print(f"building {ev['name']} v{ev['version']}: {ev['samples']} samples in {ev['shards']} "
                        f"shards{resumed}")
            if self.thread is None:
                self.thread = threading.Thread(target=self._beat, name="progress-lines", daemon=True)
                self.thread.start()
        elif kind == "shard":
            self.tally.shard(ev)
            last = self.tally.done_shards >= self.tally.shards
            if last or time.perf_counter() - self.last >= self.min_interval:
                self._print(f"  {self._status()}")
        elif kind == "publishing":
            self.finished = True
            self._print(f"publishing {ev['name']} v{ev['version']}")


class JsonProgress:
    """Every event as one JSON object per line on stdout, with the tally added to shard events."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.tally = Tally()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def emit(self, ev: dict[str, Any]) -> None:
        try:
            self.stream.write(json.dumps(ev, default=str, sort_keys=False) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def __call__(self, ev: dict[str, Any]) -> None:
        if ev["event"] == "plan":
            self.tally.plan(ev)
        elif ev["event"] == "shard":
            self.tally.shard(ev)
            ev = {**ev, **self.tally.as_dict()}
        self.emit(ev)


class NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __call__(self, ev: dict[str, Any]) -> None:
        pass


class RichBar:
    """A rich progress bar: bar, done/total and ``unit``, one text column per name in ``fields`` (set through
    ``self.progress.update``), elapsed time. Fits 80 columns; what is being done goes on a line of its own above."""

    def __init__(self, console: Any, unit: str, fields: tuple[str, ...], enabled: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.progress = Progress(BarColumn(bar_width=24), MofNCompleteColumn(), TextColumn(unit),
                                 *(TextColumn(f"{{task.fields[{f}]}}") for f in fields), TimeElapsedColumn(),
                                 console=console, disable=not enabled, transient=False)
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


class BarProgress(RichBar):
    """A rich progress bar; samples/s counts generated (not reused) samples only."""

    def __init__(self, console: Any):
        super().__init__(console, "samples", ("rate", "shards"))
        self.tally = Tally()

    def __call__(self, ev: dict[str, Any]) -> None:
        if ev["event"] == "plan":
            self.tally.plan(ev)
            resumed = f", {ev['finished']} already staged" if ev.get("finished") else ""
            self.console.print(f"building {ev['name']} v{ev['version']}: {ev['samples']} samples in "
                               f"{ev['shards']} shards{resumed}")
            self.task = self.progress.add_task(f"build {ev['name']} v{ev['version']}", total=ev["samples"],
                                               rate="", shards=f"0/{ev['shards']} shards")
        elif ev["event"] == "shard" and self.task is not None:
            before = self.tally.done
            self.tally.shard(ev)
            t = self.tally
            rate = f"{t.rate:.1f} samples/s" if t.generated else "reused"
            self.progress.update(self.task, advance=t.done - before, rate=rate,
                                 shards=f"{t.done_shards}/{t.shards} shards")


class TrainBar(RichBar):
    """A rich progress bar fed by the training events: steps, loss, images/s, ETA."""

    def __init__(self, console: Any, enabled: bool = True):
        super().__init__(console, "steps", ("info",), enabled)

    def __call__(self, ev: dict[str, Any]) -> None:
        if ev["event"] == "start":
            resumed = f", resuming at step {ev['resumed_from']}" if ev.get("resumed_from") is not None else ""
            self.console.print(f"training on {ev['pairs']} pairs ({ev['device']}){resumed}")
            self.task = self.progress.add_task("train", total=ev["steps"], completed=ev["step"], info="")
        elif ev["event"] == "step" and self.task is not None:
            eta = f"ETA {ev['eta_s']:.0f} s" if ev.get("eta_s") is not None else ""
            self.progress.update(self.task, completed=ev["step"],
                                 info=f"loss {ev['loss']:.4f}  {ev['images_per_s']:.1f} img/s  {eta}")
        elif ev["event"] == "checkpoint":
            self.progress.console.print(f"checkpoint {ev['step']}: validation grid {ev['grid']}")


def reporter(mode: str, console: Any = None):
    if mode == "bar":
        return BarProgress(console)
    if mode == "lines":
        return LineProgress()
    if mode == "json":
        return JsonProgress()
    return NoProgress()
