"""Pull throughput against a real S3-compatible server (moto's server mode on 127.0.0.1, through s3fs), with the fair
baseline a user would run instead: a recursive fsspec copy (``s3fs`` ``put``/``get``, what ``aws s3 sync`` does)
that checks nothing.

    OMP_NUM_THREADS=1 python bench/bench_pull.py --samples 16 --repeat 3 --out docs/pull_bench.json

Measures, on one published chest-CT version (``--samples`` images of 512 x 512 plus labels and instances):
local -> S3, S3 -> local, S3 -> S3 with ``pairforge pull`` (every sha256 checked, staged, committed atomically) and
the unchecked recursive copies; and a resumed pull whose files are all staged already (re-hashed, none copied).
moto on the same machine has no network latency, so these numbers show the pull's own overhead, not S3's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="runs per case (fresh destinations); the median is reported")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    import logging

    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    from flows.pipeline import make_samples
    from schemas.spec import load_spec_text, spec_hash
    from store import DatasetStore

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    opts = {"key": "bench", "secret": "bench", "skip_instance_cache": True, "use_listings_cache": False,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                 aws_secret_access_key="bench").create_bucket(Bucket="bench")
    fs = s3fs.S3FileSystem(**opts)
    tmp = Path(tempfile.mkdtemp(prefix="pairforge-bench-pull-"))
    try:
        text = (f"name: bench-pull\nsamples: {args.samples}\nshard_size: 8\nimage: {{size: 512, spacing_mm: 0.7}}\n"
                "findings:\n  negatives: 0.2\n  mixture: [\"12 mm solid nodule, right lower lobe\"]\n")
        spec = load_spec_text(text)
        samples = make_samples(spec, range(spec.samples), digest=spec_hash(spec))
        local = DatasetStore(str(tmp / "src"))
        b = local.open_build(spec, text, spec_hash(spec), "bench-code")
        for i, r in enumerate(b.shards):
            b.write_shard(i, [samples[j] for j in r])
        b.publish(run_id="bench")
        vdir = tmp / "src" / "bench-pull" / "v1"
        nbytes = sum(p.stat().st_size for p in vdir.rglob("*") if p.is_file())
        nfiles = sum(1 for p in vdir.rglob("*") if p.is_file())
        rows = []

        def timed(label: str, fn, repeat: int) -> None:
            times, res = [], None
            for k in range(repeat):
                t = time.perf_counter()
                res = fn(k)
                times.append(time.perf_counter() - t)
            s = sorted(times)[len(times) // 2]
            rows.append({"case": label, "median_seconds": round(s, 3), "seconds": [round(x, 3) for x in times],
                         "MB_per_s": round(nbytes / s / 1e6, 2), "files_per_s": round(nfiles / s, 1),
                         "reused_files": getattr(res, "reused_files", None)})
            print(f"{label:46s} median {s:6.2f} s of {len(times)}  {nbytes / s / 1e6:6.1f} MB/s  "
                  f"{nfiles / s:6.1f} files/s", flush=True)

        w, n = args.workers, args.repeat
        for k in range(n):  # the published copy every S3 case reads from (not timed)
            fs.put(str(vdir), f"bench/src{k}/bench-pull/v1", recursive=True)
        timed("pairforge pull local -> S3", lambda k: local.pull_to("bench-pull@v1", f"s3://bench/a{k}", opts,
                                                                    workers=w), n)
        timed("baseline s3fs put -r (no checks)", lambda k: fs.put(str(vdir), f"bench/pa{k}/v1", recursive=True), n)
        timed("pairforge pull S3 -> local", lambda k: DatasetStore(f"s3://bench/src{k}", opts).pull_to(
            "bench-pull@v1", str(tmp / f"dl{k}"), workers=w), n)
        timed("baseline s3fs get -r (no checks)", lambda k: fs.get(f"bench/src{k}/bench-pull/v1",
                                                                   str(tmp / f"gl{k}") + "/", recursive=True), n)
        timed("pairforge pull S3 -> S3", lambda k: DatasetStore(f"s3://bench/src{k}", opts).pull_to(
            "bench-pull@v1", f"s3://bench/b{k}", opts, workers=w), n)
        timed("baseline s3fs copy -r (no checks)", lambda k: fs.copy(f"bench/src{k}/bench-pull/v1", f"bench/pb{k}/v1",
                                                                     recursive=True), n)

        def resumed(k: int):  # every file staged already: the manifest taken away, the pull run again
            fs.rm(f"bench/b{k}/bench-pull/v1/manifest.json")
            return DatasetStore(f"s3://bench/src{k}", opts).pull_to("bench-pull@v1", f"s3://bench/b{k}", opts,
                                                                    workers=w)

        timed("pairforge pull S3 -> S3, resumed, all staged", resumed, n)
        result = {"samples": args.samples, "files": nfiles, "bytes": nbytes, "workers": w, "repeat": n,
                  "server": "moto ThreadedMotoServer on 127.0.0.1", "cpu_count": os.cpu_count(),
                  "load_avg_1min": round(os.getloadavg()[0], 2), "rows": rows}
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
            print(f"wrote {args.out}")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
