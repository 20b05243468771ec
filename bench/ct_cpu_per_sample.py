"""CPU time (process_time) of one chest-CT sample on one core: layout, render and measurements + QC timed apart, then
whole ``make_samples`` calls (QC regenerations included). CPU time, not wall time, so that two code trees run in
the same minutes on a loaded machine can be compared by their ratio:

    cd TREE && OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/ct_cpu_per_sample.py [N]

(run the copy in each tree, interleaved: new, old, new, old).
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench._single_core  # noqa: E402,F401

from annotators import annotate  # noqa: E402
from flows.pipeline import backend_for, make_samples  # noqa: E402
from schemas.plan import plan_sample  # noqa: E402
from schemas.seeding import STREAM_GENERATE, sample_rng  # noqa: E402
from schemas.spec import load_spec, spec_hash, validate_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
data = load_spec(str(ROOT / "examples/chest_ct_nodules.yaml")).model_dump(mode="json")
data["samples"] = 1000
spec = validate_spec(data)
digest = spec_hash(spec)
be = backend_for(spec)
make_samples(spec, range(3))  # warm-up (imports, caches)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 60
clk = time.process_time
T = {"layout": 0.0, "render": 0.0, "annot": 0.0, "total": 0.0}
for i in range(n):
    req = plan_sample(spec, i, digest)
    rng = sample_rng(digest, i, STREAM_GENERATE, 0)
    t0 = clk()
    try:
        lay = be.layout(spec, req, rng)
    except Exception:  # a placement failure: make_samples below regenerates it
        continue
    t1 = clk()
    img, _ = be.render(lay, rng)
    t2 = clk()
    annotate(spec.domain, img, lay, req, spec.qc)
    T["layout"] += t1 - t0
    T["render"] += t2 - t1
    T["annot"] += clk() - t2
t = clk()
for i in range(n):
    make_samples(spec, [i])
T["total"] = clk() - t
print(" ".join(f"{k} {v / n * 1000:.2f}" for k, v in T.items()) + "  (ms of CPU per sample; total = make_samples)")
