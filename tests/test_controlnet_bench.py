"""The GPU benchmark script runs end to end in its CPU smoke mode (tiny models) and reports what it promises: every
configuration in one process, a failing configuration recorded without stopping the others, FLOPs, and PSNR."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_mode_runs_every_configuration_and_fails_soft(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_controlnet_gpu.py"), "--tiny", "--budget-s", "600",
                           "--only", "a_diffusers_default,b_diffusers_fp16,b_diffusers_bf16,c_pairforge_eager,"
                                     "d_pairforge_fast", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    c = r["configs"]
    # float16 is refused on the CPU: that configuration fails, and the ones after it still run.
    assert "float16" in c["b_diffusers_fp16"]["error"]
    for name in ("a_diffusers_default", "b_diffusers_bf16", "c_pairforge_eager", "d_pairforge_fast"):
        assert c[name]["images_per_s"] > 0 and c[name]["images"] >= c[name]["per_call"], (name, c[name])
        assert c[name]["vs_competent_diffusers"] > 0
    assert c["a_diffusers_default"]["per_call"] == 1 and c["c_pairforge_eager"]["per_call"] == r["batch"]
    assert c["d_pairforge_fast"]["compile_warmup_s"] > 0
    assert r["unet_controlnet_gflop_per_cfg_step"] > 0
    # Same prompts, control images, seeds and scheduler: pairforge's images are diffusers' images (up to rounding),
    # and the compiled path computes what the eager one does.
    q = r["psnr_db_first_batch"]
    assert q["c_pairforge_eager vs b_diffusers_bf16"] > 35
    assert q["d_pairforge_fast vs c_pairforge_eager"] > 35
    assert "smoke run: not a performance number" in proc.stdout
