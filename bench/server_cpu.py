"""Where the local API server's CPU goes: starts ``flows.settings.LocalServer`` alone (as ``pairforge build`` does),
reports its start-up CPU, its CPU over 20 s idle, then runs one ``pairforge build`` of the example spec (N samples,
512x512, shard_size unset) against it through ``PREFECT_API_URL`` and reports the server's CPU during the build.

    OMP_NUM_THREADS=1 python bench/server_cpu.py --samples 1000
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import psutil  # noqa: E402

from bench_flow import _bench_prefect_home, bench_spec_text  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--idle-s", type=float, default=20.0)
    a = ap.parse_args()
    os.environ["PREFECT_HOME"] = _bench_prefect_home()
    from flows.settings import LocalServer

    server = LocalServer().start()
    t0 = time.perf_counter()
    server.wait()
    proc = psutil.Process(server.process.pid)

    def cpu() -> float:
        c = proc.cpu_times()
        return c.user + c.system

    try:
        ready = cpu()
        print(f"start-up: {time.perf_counter() - t0:.1f} s wall, {ready:.2f} s CPU")
        time.sleep(a.idle_s)
        idle = cpu()
        print(f"idle {a.idle_s:.0f} s: {idle - ready:.2f} s CPU")
        work = tempfile.mkdtemp(prefix="pf-server-cpu-")
        (Path(work) / "spec.yaml").write_text(bench_spec_text(a.samples, 512, "unset"))
        env = {**os.environ, "PREFECT_API_URL": server.api_url, "PYTHONPATH": str(REPO)}
        env.setdefault("OMP_NUM_THREADS", "1")
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "flows.cli", "build", f"{work}/spec.yaml", "--root", f"{work}/data",
                        "--workers", "2"], env=env, cwd=str(REPO), check=True, capture_output=True)
        print(f"build of {a.samples} samples: {time.perf_counter() - t:.1f} s wall; server CPU during it "
              f"{cpu() - idle:.2f} s")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
