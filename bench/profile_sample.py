"""Where one sample's milliseconds go on one core: plan, layout, render, measure + QC, watermark, PNG encode, sha256,
index row + Parquet, the version browser's images, file writes — the same calls ``make_samples`` + ``BuildStaging.write_shard`` make, timed one by
one on the spec's first N samples. Also times PNG encoding with libdeflate (the ``deflate`` package, if installed)
against the OpenCV/zlib encoder the store uses, at the compression each gives for the same pixels.

    OMP_NUM_THREADS=1 python bench/profile_sample.py examples/chest_ct_nodules.yaml -n 100 --out profile.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

STAGES = ("plan", "layout", "render", "measure_qc", "retries", "encode", "watermark", "png_encode", "sha256", "row",
          "label_counts", "browser", "parquet", "write")


def _png_libdeflate(a: np.ndarray, level: int) -> bytes:
    """A standard PNG (filter 'up' on every row, one IDAT) compressed by libdeflate."""
    import deflate

    h, w = a.shape[:2]
    be = a.astype(">u2") if a.dtype == np.uint16 else a
    raw = be.reshape(h, -1).view(np.uint8)
    up = raw.copy()
    up[1:] = raw[1:] - raw[:-1]  # PNG filter 2 (Up), modulo 256
    rows = np.concatenate([np.full((h, 1), 2, np.uint8), up], axis=1)
    depth = 16 if a.dtype == np.uint16 else 8

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", deflate.zlib_compress(rows.tobytes(), level))
            + chunk(b"IEND", b""))


def _png_opencv(a: np.ndarray) -> bytes:
    """The OpenCV/zlib level-1 PNG the store wrote before libdeflate."""
    import cv2

    ok, buf = cv2.imencode(".png", a, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return buf.tobytes()


clock = time.process_time  # CPU time: what a sample costs, whatever else the machine runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("spec")
    ap.add_argument("-n", "--samples", type=int, default=100)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from flows import allocator

    allocator.tune()  # as pairforge build's processes: a no-op unless PAIRFORGE_MALLOC=heap (flows/allocator.py)
    import flows.shard_imports  # noqa: F401  (pyarrow's one-off pandas check, paid before the fork in a build)
    t_imp = time.perf_counter()
    from annotators import annotate
    from flows.inputs import code_version, resolve_spec
    from flows.pipeline import backend_for, make_samples
    from schemas.plan import plan_sample
    from schemas.seeding import STREAM_GENERATE, sample_rng
    from schemas.spec import spec_hash
    import pyarrow as pa

    from schemas.arrow import SAMPLE_SCHEMA
    from store import DatasetStore, codec, codecs
    from store import watermark as wm
    from store.build import _encode_sample, label_counts, parquet_bytes
    from flows.browser import sample_files
    imports_s = time.perf_counter() - t_imp

    spec, text = resolve_spec(Path(a.spec).read_text())
    digest = spec_hash(spec)
    backend = backend_for(spec)
    n = min(a.samples, spec.samples)
    ms = {k: [] for k in STAGES}
    tmp = tempfile.mkdtemp(prefix="pf-profile-")
    staging = DatasetStore(tmp).open_build(spec, text, digest, code_version())
    from store.build import _provenance  # the store's own provenance record (what encode_sample writes)

    samples = []
    for i in range(n):
        t = clock()
        req = plan_sample(spec, i, digest)
        t1 = clock()
        rng = sample_rng(digest, i, STREAM_GENERATE, 0)
        lay = backend.layout(spec, req, rng)
        t2 = clock()
        img, _ = backend.renderer.render(lay, rng)
        t3 = clock()
        ann = annotate(spec.domain, img, lay, req, spec.qc)
        t4 = clock()
        ms["plan"].append(t1 - t), ms["layout"].append(t2 - t1), ms["render"].append(t3 - t2)
        ms["measure_qc"].append(t4 - t3)
    # The whole first-attempt-plus-retries path, to charge QC regeneration per sample.
    t = clock()
    samples = make_samples(spec, range(n), digest=digest, backend=backend)
    whole = clock() - t
    first_attempts = sum(ms["plan"]) + sum(ms["layout"]) + sum(ms["render"]) + sum(ms["measure_qc"])
    retry_s = max(0.0, whole - first_attempts)
    ms["retries"] = [retry_s / n] * n
    attempts = [int(s.qc.get("attempts", 1)) for s in samples]

    png = {"opencv_zlib_level1": [], "libdeflate_level1": [], "libdeflate_level3": [],
           # the instance map alone, as the store writes it (run-length coder) and as it did before (libdeflate)
           "instance_runs": [], "instance_libdeflate_level1": []}
    png_bytes = {k: 0 for k in png}
    image_codec = codecs.codec_for_domain(spec.domain)
    encoded = []  # the store's whole encode of each sample (files, index row, stored array)
    for s in samples:
        t0 = clock()
        stored = image_codec.encode(np.asarray(s.image))
        encoding = image_codec.describe(stored)
        keep_out = image_codec.keep_out(np.asarray(s.instance))
        t1 = clock()
        payload = wm.payload_for(spec.name, 1, s.index)
        stored = image_codec.watermark(stored, payload, keep_out=keep_out)
        t2 = clock()
        prov = _provenance(spec.name, 1, s, code_version(), payload.hex, encoding)
        files = [image_codec.to_bytes(stored, text=prov), image_codec.label_to_bytes(s.label),
                 image_codec.instance_to_bytes(s.instance)]
        t3 = clock()
        _ = [codec.sha256(f) for f in files]
        t4 = clock()
        ms["encode"].append(t1 - t0), ms["watermark"].append(t2 - t1), ms["png_encode"].append(t3 - t2)
        ms["sha256"].append(t4 - t3)
        # The store's whole encode of the same sample, right after: what it spends beyond the stages above is the
        # provenance record and the index row (timed here, per sample, rather than as a residual of a later pass,
        # which also took in the later pass's own speed).
        t5 = clock()
        encoded.append(_encode_sample(spec.name, 1, s, code_version(), bool(spec.watermark)))
        ms["row"].append(max(0.0, (clock() - t5) - (t4 - t0)))
        # Encoder comparison on the same three arrays (no text chunk: it is the same bytes in all).
        arrays = [stored, np.asarray(s.label, np.uint8), np.asarray(s.instance, np.uint16)]
        for key in png:
            tt = clock()
            if key.startswith("instance_"):
                out = [codec.encode_png(arrays[2], png_filter="none", runs=key == "instance_runs")]
            elif key.startswith("opencv"):
                out = [_png_opencv(x) for x in arrays]
            else:
                try:
                    out = [_png_libdeflate(x, int(key[-1])) for x in arrays]
                except ImportError:
                    continue
            png[key].append(clock() - tt)
            png_bytes[key] += sum(len(b) for b in out)
    # The store's own write_shard, whole (CPU time), then its parts one by one on the same samples.
    t0 = clock()
    info = staging.write_shard(0, samples, sample_files=sample_files) if n == len(staging.shards[0]) else None
    ws = clock() - t0
    enc = [(f, row) for f, row, _ in encoded]  # the store's encodes from the loop above
    t0 = clock()
    for s in samples:
        label_counts(np.asarray(s.label, np.uint8))
    t_counts = clock() - t0
    # The version browser's images of each sample (drawn in the shard workers: flows.browser.sample_files).
    browser_files = {}
    for s, (own, row, stored) in zip(samples, encoded):
        t0 = clock()
        browser_files.update(sample_files(s, stored, row, own))
        ms["browser"].append(clock() - t0)
    t0 = clock()
    part = parquet_bytes(pa.Table.from_pylist([r for _, r in enc], schema=SAMPLE_SCHEMA))
    t_parquet = clock() - t0
    root = staging.root
    t0 = clock()
    files = {}
    for f, _ in enc:
        files.update({f"{tmp}/w/{rel}": data for rel, data in f.items()})
    files.update({f"{tmp}/w/{rel}": data for rel, data in browser_files.items()})
    root.write_many(files)
    root.write_bytes(f"{tmp}/w/part.parquet", part)
    t_write = clock() - t0
    ms["label_counts"] = [t_counts / n] * n
    ms["parquet"] = [t_parquet / n] * n
    ms["write"] = [t_write / n] * n

    def med(v):
        return 1000 * statistics.median(v) if v else float("nan")

    def mean(v):
        return 1000 * statistics.fmean(v) if v else float("nan")

    table = {k: {"median_ms": round(med(v), 2), "mean_ms": round(mean(v), 2)} for k, v in ms.items()}
    total = sum(t["mean_ms"] for t in table.values() if t["mean_ms"] == t["mean_ms"])
    out = {"spec": a.spec, "samples": n, "size": getattr(spec.image, "size", None), "imports_s": round(imports_s, 2),
           "stages": table, "total_mean_ms": round(total, 1), "mean_attempts": statistics.fmean(attempts),
           "write_shard_cpu_s": round(ws, 3), "write_shard_ms_per_sample": round(1000 * ws / n, 2),
           "clock": "time.process_time (CPU time of this process)",
           "png_encoders": {k: {"mean_ms_per_sample": round(mean(v), 2), "bytes_per_sample": png_bytes[k] // max(1, n)}
                            for k, v in png.items() if v},
           "omp_threads": os.environ.get("OMP_NUM_THREADS")}
    print(f"{'stage':12s} {'median ms':>10s} {'mean ms':>9s}")
    for k, v in table.items():
        print(f"{k:12s} {v['median_ms']:10.2f} {v['mean_ms']:9.2f}")
    print(f"{'total':12s} {'':10s} {total:9.1f}   ({1000 / total:.1f} samples/s on one core; mean attempts "
          f"{out['mean_attempts']:.2f})")
    for k, v in out["png_encoders"].items():
        print(f"PNG {k:22s} {v['mean_ms_per_sample']:7.2f} ms/sample, {v['bytes_per_sample']} bytes/sample")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
