"""Progress of a pull (store/transfer.py events ``plan``, ``file``, ``done``): a rich bar with bytes, files, speed
and time left on a terminal; nothing when stdout is not a terminal (the command prints one summary line at the end)
or with ``--quiet``; JSON lines with ``--json``.
"""
from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from flows.progress import NoProgress


class PullBar:
    def __init__(self, console: Any):
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.console = console
        self.progress = Progress(BarColumn(bar_width=24), DownloadColumn(), TextColumn("{task.fields[files]}"),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False)
        self.task = None
        self.done_files = 0
        self.total_files = 0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def __call__(self, ev: dict[str, Any]) -> None:
        if ev["event"] == "plan":
            staged = f" ({ev['staged']} staged by an earlier pull, re-checked)" if ev.get("staged") else ""
            self.console.print(f"pulling {ev['ref']} from {ev['source']} to {ev['dest']}: {ev['files']} files"
                               f"{staged}")
            self.total_files = ev["files"]
            self.task = self.progress.add_task("pull", total=ev["bytes"], files=f"0/{ev['files']} files")
        elif ev["event"] == "file" and self.task is not None:
            self.done_files += 1
            self.progress.update(self.task, advance=ev["bytes"], files=f"{self.done_files}/{self.total_files} files")


class PullJson:
    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __call__(self, ev: dict[str, Any]) -> None:
        self.stream.write(json.dumps(ev, default=str) + "\n")
        self.stream.flush()


NoPullProgress = NoProgress  # --quiet: the events are dropped


def pull_reporter(console: Any, quiet: bool = False, as_json: bool = False, stream: TextIO | None = None):
    if as_json:
        return PullJson(stream)
    stream = stream or sys.stdout
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return PullBar(console) if tty and not quiet else NoPullProgress()
