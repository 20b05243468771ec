"""Pin a benchmark to one CPU core's worth of threads (import before numpy/cv2 do work)."""
import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[var] = "1"
try:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
except (AttributeError, OSError):
    pass
import cv2  # noqa: E402

cv2.setNumThreads(1)
