"""The first Ctrl-C / SIGTERM stops a real ``pairforge build`` (embedded Prefect API, process pool) within seconds, at
any point: while the API starts, while shards run, half-way through publishing, after publishing. Checked each time:
the exit code, no process left behind, a version either complete and reported as published or absent and reported
as not published, and a rerun that resumes from what was staged.

``PAIRFORGE_TEST_HOLD`` stretches a phase so that the signal lands inside it (see flows/interrupt.py: hold).
"""
from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SPEC = """\
name: stop-ct
domain: chest_ct
samples: 8
seed: 5
image: {size: 256, spacing_mm: [1.2, 1.4]}
findings:
  negatives: 0.25
  mixture: ["8mm solid nodule, right upper lobe"]
shard_size: 2
"""
EXIT_LIMIT_S = 10.0


class Build:
    """A ``pairforge build`` in a process group of its own, its output read from a pipe or a pseudo-terminal."""

    def __init__(self, tmp: Path, hold: str = "", tty: bool = False, args: tuple[str, ...] = ()):
        self.tmp, self.tty = tmp, tty
        self.tag = uuid.uuid4().hex
        self.root = tmp / "root"
        spec = tmp / "spec.yaml"
        spec.write_text(SPEC)
        env = {**os.environ, "PYTHONPATH": str(REPO), "PAIRFORGE_TEST_TAG": self.tag,
               "PREFECT_HOME": str(tmp / "prefect-home")}
        env.pop("PREFECT_API_URL", None)  # the embedded API, started by the build
        env["PAIRFORGE_TEST_HOLD"] = hold
        cmd = [sys.executable, "-m", "flows.cli", "build", str(spec), "--root", str(self.root), "--workers", "2",
               *args]
        self.buf = b""
        if tty:
            self.master, slave = pty.openpty()

            def become_terminal_owner():  # session leader with the pty as controlling terminal, like a shell's job
                import fcntl
                import termios

                fcntl.ioctl(0, termios.TIOCSCTTY, 0)

            self.proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=slave, stdout=slave, stderr=slave,
                                         start_new_session=True, preexec_fn=become_terminal_owner)
            os.close(slave)
            self.fd = self.master
        else:
            self.proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            self.fd = self.proc.stdout.fileno()

    # ---- output
    def pump(self, timeout: float = 0.2) -> None:
        r, _, _ = select.select([self.fd], [], [], timeout)
        if r:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # pty closed
                data = b""
            self.buf += data

    @property
    def text(self) -> str:
        """What was printed, terminal control sequences (the progress bar's redraws) removed."""
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.buf.decode(errors="replace")).replace("\r", "\n")

    def wait_for(self, cond, what: str, limit: float = 240.0) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if cond():
                return
            if self.proc.poll() is not None:
                self.pump(0.1)
                raise AssertionError(f"build ended (code {self.proc.returncode}) before {what}:\n{self.text}")
            self.pump(0.1)
        raise AssertionError(f"no {what} within {limit} s:\n{self.text}")

    def finish(self, limit: float = 300.0) -> int:
        deadline = time.monotonic() + limit
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.pump(0.1)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"build did not end within {limit} s:\n{self.text}")
        for _ in range(20):
            before = len(self.buf)
            self.pump(0.05)
            if len(self.buf) == before:
                break
        return self.proc.returncode

    # ---- signals
    def interrupt(self, how: str) -> float:
        """Send the signal; return the seconds until the build process exited."""
        t0 = time.monotonic()
        if how == "ctrl-c":
            os.write(self.master, b"\x03")  # the terminal sends SIGINT to its foreground process group
        elif how == "group":
            os.killpg(self.proc.pid, signal.SIGINT)
        elif how == "sigterm":
            self.proc.send_signal(signal.SIGTERM)
        code = self.finish(limit=60)
        self.code = code
        return time.monotonic() - t0

    # ---- what is on disk and what is running
    def staging_files(self, pattern: str) -> list[Path]:
        return list((self.root / "stop-ct" / "_staging").glob(pattern))

    def published(self) -> bool:
        return (self.root / "stop-ct" / "v1" / "manifest.json").exists()

    def leftover_processes(self) -> list[str]:
        """Processes that carry this build's tag in their environment (everything it started inherits it)."""
        left = []
        needle = f"PAIRFORGE_TEST_TAG={self.tag}".encode()
        for _ in range(30):  # reaped children vanish within moments
            left = []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/environ", "rb") as f:
                        if needle in f.read():
                            with open(f"/proc/{pid}/cmdline", "rb") as f2:
                                cmd = f2.read().replace(b"\0", b" ").decode(errors="replace")
                            left.append(f"{pid}: {cmd[:120]}")
                except OSError:
                    continue
            if not left:
                return []
            time.sleep(0.1)
        return left

    def children_cmdlines(self) -> list[str]:
        import psutil

        try:
            return [" ".join(p.cmdline()) for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.Error:
            return []


def _check_stopped(b: Build, seconds: float, code: int = 130) -> str:
    text = b.text
    assert seconds < EXIT_LIMIT_S, f"took {seconds:.1f} s to stop:\n{text}"
    assert b.code == code, f"exit code {b.code}, expected {code}:\n{text}"
    assert not b.leftover_processes(), f"processes left: {b.leftover_processes()}"
    assert "Traceback" not in text and "EventsWorker" not in text, text
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    last = lines[-1]
    assert last.startswith("interrupted ("), text
    if b.published():
        assert "is published and complete" in last, text
        m = json.loads((b.root / "stop-ct" / "v1" / "manifest.json").read_text())
        assert m["counts"]["samples"] == 8 and len(m["files"]) > 0
    else:
        assert "nothing was published" in last and "rerun the same command" in last, text
        assert not (b.root / "stop-ct" / "v1").exists()
    assert not b.staging_files("**/*.tmp-*"), "half-written files left in staging"
    return last


def _rerun(tmp: Path) -> str:
    b = Build(tmp)
    code = b.finish()
    assert code == 0, b.text
    assert (b.root / "stop-ct" / "v1" / "manifest.json").exists(), b.text
    assert not (b.root / "stop-ct" / "v2").exists(), "the rerun made a second version"
    return b.text


def test_sigint_to_the_group_while_the_api_starts_stops_and_publishes_nothing(tmp_path):
    b = Build(tmp_path, hold="api=6,shard=1", args=("--json",))
    b.wait_for(lambda: any("uvicorn" in c for c in b.children_cmdlines()), "the API server process")
    # The workers begin the shards while the API starts (flows/head_start.py): stop once one is committed.
    b.wait_for(lambda: b.staging_files("*/parts/*.done.json"), "a shard begun while the API starts")
    seconds = b.interrupt("group")
    last = _check_stopped(b, seconds)
    assert "while starting the local Prefect API" in last
    done = int(re.search(r"(\d+) of 4 shards", last).group(1))
    assert 1 <= done <= 4 and not b.published()
    events = [json.loads(ln) for ln in b.text.splitlines() if ln.startswith("{")]
    assert events[0]["event"] == "plan"  # progress starts with the head start, before the API answers
    assert events[-1] == {"event": "interrupted", "signal": "SIGINT", "exit_code": 130, "published": False,
                          "message": last, "name": "stop-ct", "version": 1}
    again = _rerun(tmp_path)
    assert f"{done} already staged" in again, again


def test_sigint_while_shards_run_keeps_finished_shards_and_the_rerun_resumes(tmp_path):
    b = Build(tmp_path, hold="shard=2.5")
    b.wait_for(lambda: b.staging_files("*/parts/*.done.json"), "a finished shard")
    seconds = b.interrupt("group")
    last = _check_stopped(b, seconds)
    done = int(re.search(r"(\d+) of 4 shards", last).group(1))
    assert 1 <= done < 4 and not b.published()
    assert len(b.staging_files("*/parts/*.done.json")) == done
    again = _rerun(tmp_path)
    assert f"{done} already staged" in again, again
    assert re.search(rf"shards: {4 - done} generated, {done} reused", again), again


def test_ctrl_c_in_a_terminal_while_shards_run(tmp_path):
    b = Build(tmp_path, hold="shard=2.5", tty=True)
    b.wait_for(lambda: b.staging_files("*/parts/*.done.json"), "a finished shard")
    seconds = b.interrupt("ctrl-c")
    _check_stopped(b, seconds)
    assert not b.published()
    assert b.buf.rstrip().endswith(b"rerun the same command to resume")  # on a line of its own
    assert b"\x1b[?25h" in b.buf.split(b"interrupted (")[0][-200:]  # the bar's hidden cursor is shown again


def test_sigint_half_way_through_publishing_publishes_nothing_and_the_rerun_publishes(tmp_path):
    b = Build(tmp_path, hold="card=6")
    b.wait_for(lambda: b.staging_files("*/data/samples.parquet"), "publishing to start")
    seconds = b.interrupt("group")
    last = _check_stopped(b, seconds)
    assert not b.published() and "4 of 4 shards" in last and "publishing had started" in last
    again = _rerun(tmp_path)
    assert "4 already staged" in again and "published stop-ct@v1" in again, again


def test_sigterm_after_the_publish_rename_reports_the_version_as_published(tmp_path):
    b = Build(tmp_path, hold="published=6")
    b.wait_for(b.published, "the version to be published")
    seconds = b.interrupt("sigterm")
    last = _check_stopped(b, seconds, code=143)
    assert "stop-ct@v1 is published and complete" in last
    again = _rerun(tmp_path)
    assert "up to date: stop-ct@v1" in again, again
