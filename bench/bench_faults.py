"""Builds under injected storage faults: how many complete, how many fail cleanly, how many published versions have a
missing or corrupt file (must be 0), and whether reruns finish every failed build.

    python bench/bench_faults.py --builds 20 --rate 0.05 [--seed 1] [--json out.json]

S3: moto's real server behind bench/faults.py's HTTP fault proxy (500, 503, 503 SlowDown, a hang past the client's
1 s read timeout, a connection reset before or after the server acted), on every read, write and list request.
Local disk: the ``faultfile://`` filesystem raising EIO or ENOSPC on the store's write, fsync and rename steps.
Each build is a different dataset (its own name, so its own watermark and version numbers): open (or resume) ->
write its shards -> publish, through the store's real code paths (store.DatasetStore). The samples are generated
once and reused by every build: faults hit storage, not generation.

A failure is *clean* when it is a typed error with a one-line message (StoreError/NoSpaceError/PublishError or an
OSError after the retries ran out) and the dataset shows no published version. Afterwards, with the faults off,
every published version is re-hashed by ``verify_version`` (every file against its sha256 and the content digest).
Failed builds are then rerun -- with the faults still on -- until each is published (at most ``--rounds`` reruns).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench.faults as faults  # noqa: E402
from schemas.spec import load_spec_text, spec_hash  # noqa: E402
from store import DatasetStore, verify_version  # noqa: E402
from store.errors import StoreError  # noqa: E402

CODE = "bench-faults"


def one_build(url: str, opts: dict | None, name: str, samples: dict) -> tuple[str, str]:
    """-> (outcome, detail): published / failed_clean / failed_unclean."""
    text = faults.small_ct_spec(name)
    spec = load_spec_text(text)
    try:
        st = DatasetStore(url, opts)
        b = st.open_build(spec, text, spec_hash(spec), CODE)
        for i, r in enumerate(b.shards):
            if not b.has_shard(i):
                b.write_shard(i, [samples[j] for j in r])
        pv = b.publish(run_id="bench-faults")
        return "published", f"v{pv.version}"
    except (StoreError, OSError) as e:
        msg = " ".join(str(e).split())
        one_line = bool(msg) and "\n" not in str(e).strip()
        return ("failed_clean" if one_line else "failed_unclean"), f"{type(e).__name__}: {msg[:160]}"
    except Exception as e:  # anything else is not a clean failure
        return "failed_unclean", f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"


def run_backend(kind: str, n: int, rate: float, seed: int, rounds: int, samples: dict, workdir: str) -> dict:
    names = [f"fault-{kind}-{k:02d}" for k in range(n)]
    out: dict = {"backend": kind, "builds": n, "rate": rate}
    with contextlib_exit() as stack:
        if kind == "s3":
            endpoint, _ = stack.enter(faults.moto_server(bucket="bench-faults"))
            proxy = stack.enter(faults.FaultProxy(endpoint, rate=rate, seed=seed, hang_s=2.0))
            url = "s3://bench-faults/root"
            opts = faults.s3_options(proxy.endpoint, read_timeout=1.0)
            clean_opts = faults.s3_options(endpoint)

            def set_faults(on: bool) -> None:
                proxy.enabled = on

            def injected() -> dict:
                return {"requests": proxy.stats.requests, **proxy.stats.injected}
        else:
            path = os.path.join(workdir, "local-root")
            url = f"faultfile://{path}"
            opts = {"rate": rate, "seed": seed}
            fs = DatasetStore(url, opts).root.fs
            clean_opts = None

            def set_faults(on: bool) -> None:
                fs.rate = rate if on else 0.0

            def injected() -> dict:
                return dict(fs.injected)
        verify_url = url if kind == "s3" else path

        t0 = time.perf_counter()
        results = {name: one_build(url, opts, name, samples) for name in names}
        out["first_pass_s"] = round(time.perf_counter() - t0, 1)
        out["completed"] = sum(r[0] == "published" for r in results.values())
        out["failed_clean"] = sum(r[0] == "failed_clean" for r in results.values())
        out["failed_unclean"] = sum(r[0] == "failed_unclean" for r in results.values())
        out["failures"] = sorted({d.split(":", 1)[0] + ": " + d.split(":", 1)[1].strip()[:90]
                                  for o, d in results.values() if o != "published"})[:8]
        out["faults_injected_first_pass"] = injected()

        set_faults(False)
        st = DatasetStore(verify_url, clean_opts)
        failed_visible = [nm for nm, r in results.items() if r[0] != "published" and st.versions(nm)]
        out["failed_builds_with_a_visible_version"] = len(failed_visible)
        bad = []
        for nm, r in results.items():
            for v in st.versions(nm):
                rep = verify_version(f"{nm}@v{v}", verify_url, clean_opts)
                if not rep.ok:
                    bad.append(f"{nm}@v{v}: {rep.problems[:2]}")
        out["published_versions_checked"] = sum(len(st.versions(nm)) for nm in names)
        out["published_with_missing_or_corrupt_file"] = len(bad)
        out["bad"] = bad

        set_faults(True)
        pending = [nm for nm, r in results.items() if r[0] != "published"]
        reruns = []
        for rnd in range(1, rounds + 1):
            if not pending:
                break
            again = {nm: one_build(url, opts, nm, samples) for nm in pending}
            pending = [nm for nm, r in again.items() if r[0] != "published"]
            reruns.append({"round": rnd, "tried": len(again), "published": len(again) - len(pending)})
        out["reruns"] = reruns
        out["unfinished_after_reruns"] = len(pending)
        out["faults_injected_total"] = injected()

        set_faults(False)
        st = DatasetStore(verify_url, clean_opts)
        final_bad = 0
        versions = {nm: st.versions(nm) for nm in names}
        for nm, vs in versions.items():
            for v in vs:
                final_bad += not verify_version(f"{nm}@v{v}", verify_url, clean_opts).ok
        out["finished"] = sum(vs == [1] for vs in versions.values())
        out["final_versions_with_missing_or_corrupt_file"] = final_bad
        out["dead_staging_left"] = len([g for g in st.gc(older_than_s=0.0).dead if g.kind == "staging"])
    return out


class contextlib_exit:
    """A tiny ExitStack with enter() returning the context's value."""

    def __enter__(self):
        import contextlib

        self._stack = contextlib.ExitStack().__enter__()
        return self

    def enter(self, cm):
        return self._stack.enter_context(cm)

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--builds", type=int, default=20)
    ap.add_argument("--rate", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10, help="reruns at most")
    ap.add_argument("--backends", default="s3,local")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    samples = faults.small_ct_samples(faults.small_ct_spec("fault-samples"))
    work = tempfile.mkdtemp(prefix="pairforge-bench-faults-")
    results = []
    try:
        for kind in a.backends.split(","):
            r = run_backend(kind.strip(), a.builds, a.rate, a.seed, a.rounds, samples, work)
            results.append(r)
            print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print("| storage | builds | fault rate | completed | failed cleanly | failed otherwise | published with a missing or "
          "corrupt file | rerun rounds | finished after reruns | faults injected |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        inj = ", ".join(f"{k} {v}" for k, v in r["faults_injected_total"].items())
        print(f"| {r['backend']} | {r['builds']} | {r['rate']:.0%} | {r['completed']} | {r['failed_clean']} | "
              f"{r['failed_unclean']} | {r['published_with_missing_or_corrupt_file']} "
              f"(final: {r['final_versions_with_missing_or_corrupt_file']}) | {len(r['reruns'])} | "
              f"{r['finished']}/{r['builds']} | {inj} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
