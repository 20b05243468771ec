"""bench/profile_sample.py runs on the shipped example and reports every stage, each timed rather than guessed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_profile_reports_every_stage_and_a_total_that_adds_up(tmp_path):
    out = tmp_path / "profile.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "bench/profile_sample.py", "examples/chest_ct_nodules.yaml", "-n", "3",
                        "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from profile_sample import STAGES
    finally:
        sys.path.remove(str(REPO / "bench"))
    got = json.loads(out.read_text())
    assert got["samples"] == 3 and set(got["stages"]) == set(STAGES)
    means = {k: v["mean_ms"] for k, v in got["stages"].items()}
    assert all(v >= 0 for v in means.values()), means
    # the work that must cost something on every sample does
    assert all(means[k] > 0 for k in ("layout", "render", "measure_qc", "png_encode", "sha256", "browser")), means
    assert abs(got["total_mean_ms"] - sum(means.values())) < 0.05
    # the index row is timed per sample against the same sample's stages, not left as a residual of a later pass
    assert means["row"] < means["png_encode"] + means["watermark"] + means["encode"]
    assert got["png_encoders"]["libdeflate_level1"]["bytes_per_sample"] > 0
    assert "total" in p.stdout and "samples/s on one core" in p.stdout
