"""Where a build's CPU goes, process by process, and how much of the machine sat idle: runs ``pairforge build`` (or
the bench's fair loop) on the example spec with N samples in a fresh root, samples every process of the command
(CLI, API server, pool workers) every 0.2 s and the machine's busy cores every 0.5 s, and prints each process's CPU
seconds, when it started (seconds after launch: e.g. when the pool's workers were forked), the idle core-seconds
and the busy-core timeline.

    OMP_NUM_THREADS=1 python bench/cpu_roles.py --samples 1000 --mode build
    OMP_NUM_THREADS=1 python bench/cpu_roles.py --samples 1000 --mode tuned     # the loop + PAIRFORGE_MALLOC=heap

Read the idle core-seconds with the timeline: a command that leaves a core idle while it starts or publishes can
spend that much more CPU elsewhere at no cost in wall time."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from bench_flow import PAIRFORGE, _command_env, bench_spec_text  # noqa: E402


def _busy() -> tuple[int, int]:
    v = list(map(int, open("/proc/stat").readline().split()[1:]))
    return sum(v) - v[3] - v[4], sum(v)  # (busy jiffies, all jiffies), all cores


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--shard-size", default="example", help='an integer, "example" (as shipped) or "unset"')
    ap.add_argument("--mode", choices=["build", "loop", "tuned"], default="build")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--example", default="chest_ct_nodules", help="examples/NAME.yaml (bench_flow.EXAMPLES)")
    ap.add_argument("--size", type=int, default=512, help="image size in pixels (0: the example's own)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="pf-roles-")
    spec = Path(tmp) / "spec.yaml"
    spec.write_text(bench_spec_text(a.samples, a.size or None, a.shard_size if a.shard_size in ("example", "unset")
                                    else int(a.shard_size), a.example))
    data = str(Path(tmp) / "data")
    if a.mode == "build":
        argv = [PAIRFORGE, "build", str(spec), "--root", data, "--workers", str(a.workers), "-q"]
    else:
        argv = [sys.executable, str(Path(__file__).with_name("bench_flow.py")), "--bare-run", str(spec), data,
                "--workers", str(a.workers)] + (["--tuned"] if a.mode == "tuned" else [])
    cores = os.cpu_count() or 1
    timeline: list[float] = []
    done = threading.Event()

    def machine() -> None:
        b0, t0 = _busy()
        while not done.wait(0.5):
            b1, t1 = _busy()
            timeline.append(round(cores * (b1 - b0) / max(1, t1 - t0), 2))
            b0, t0 = b1, t1

    th = threading.Thread(target=machine, daemon=True)
    th.start()
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, env=_command_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: dict[int, tuple[float, str]] = {}
    first: dict[int, float] = {}  # seconds after launch at which each process was first seen (0.2 s sampling)
    while p.poll() is None:
        try:
            top = psutil.Process(p.pid)
            for q in [top] + top.children(recursive=True):
                try:
                    c = q.cpu_times()
                    seen[q.pid] = (c.user + c.system, " ".join(q.cmdline()))
                    first.setdefault(q.pid, round(time.perf_counter() - t0, 1))
                except psutil.Error:
                    continue
        except psutil.Error:
            pass
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    err = p.stderr.read()
    shutil.rmtree(tmp, ignore_errors=True)
    if p.returncode != 0:
        print(err[-2000:], file=sys.stderr)
        return p.returncode

    def role(cmd: str, pid: int) -> str:
        if "server_app" in cmd or "prefect.server.api.server" in cmd:  # the local API server (older builds: Prefect's factory)
            return "api_server"
        if pid == p.pid:
            return "main"
        if "resource_tracker" in cmd:
            return "resource_tracker"
        return "worker"

    procs = [{"pid": pid, "role": role(cmd, pid), "cpu_s": round(c, 2), "started_s": first.get(pid)}
             for pid, (c, cmd) in sorted(seen.items())]
    idle = sum(max(0.0, cores - b) * 0.5 for b in timeline)
    out = {"mode": a.mode, "samples": a.samples, "shard_size": a.shard_size, "wall_s": round(wall, 1),
           "cpu_s": round(sum(x["cpu_s"] for x in procs), 1), "idle_core_s": round(idle, 1), "processes": procs,
           "busy_cores_every_0_5_s": timeline, "command": " ".join(["python"] + sys.argv)}
    print(f"{a.mode}: {a.samples} samples, wall {out['wall_s']} s, CPU {out['cpu_s']} s, idle core-seconds "
          f"{out['idle_core_s']}")
    for x in procs:
        if x["cpu_s"] >= 0.05:
            print(f"  {x['role']:16s} pid {x['pid']:7d} {x['cpu_s']:7.2f} s   (started {x['started_s']} s after launch)")
    print("  busy cores every 0.5 s: " + " ".join(f"{b:.1f}" for b in timeline))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
