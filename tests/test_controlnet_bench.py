"""The GPU benchmark script runs end to end in its CPU smoke mode (tiny models) and reports what it promises."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_mode_reports_both_pipelines_and_flops(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_controlnet_gpu.py"), "--device", "cpu", "--tiny",
                           "--steps", "2", "--images", "2", "--baseline-images", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["a_baseline"]["images_per_s"] > 0 and r["b_pairforge"]["images_per_s"] > 0
    assert r["b_pairforge"]["images"] % r["b_pairforge"]["batch"] == 0
    assert r["unet_controlnet_gflop_per_step_cfg"] > 0 and r["achieved_tflops_b"] > 0
    assert "smoke run: not a performance number" in proc.stdout
