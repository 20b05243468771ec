"""Many builds against one root at once (local folder and moto's real S3 server): builds of the same spec share one
version, builds of different specs get distinct, gap-free numbers, readers listing and loading during the publishes
never see a half-published version, and everything verifies afterwards. Real processes, real files.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time

import pytest

import bench.faults as faults
from schemas.spec import load_spec_text, spec_hash
from store import DatasetStore, IntegrityError, StoreError, verify_version


MOTO_BUCKET = "pairforge-conc"

BUILDER = r"""
import json, pickle, sys, time
sys.path.insert(0, {repo!r})
from schemas.spec import load_spec_text, spec_hash
from store import DatasetStore
text, samples, url, opts, go = pickle.load(open(sys.argv[1], "rb"))
spec = load_spec_text(text)
st = DatasetStore(url, opts)
while time.time() < go:  # every process starts at the same moment
    time.sleep(0.005)
b = st.open_build(spec, text, spec_hash(spec), "conc-code")
for i, r in enumerate(b.shards):
    if not b.has_shard(i):
        b.write_shard(i, [samples[j] for j in r])
print(json.dumps({{"name": spec.name, "seed": spec.seed, "version": b.publish(run_id=sys.argv[2]).version}}))
"""


@pytest.fixture(scope="module")
def samples():
    return faults.small_ct_samples(faults.small_ct_spec("conc", seed=1))


def _reader(url, opts, stop: threading.Event, seen: dict, errors: list) -> None:
    """List and load every visible version, checking every file's sha256, until ``stop``."""
    st = DatasetStore(url, opts)
    while not stop.is_set():
        try:
            for name in st.list_datasets():
                for v in st.versions(name):
                    ds = st.load(f"{name}@v{v}")  # verify=True: every file checked against its sha256
                    for k in range(len(ds)):
                        ds[k]
                    seen.setdefault(f"{name}@v{v}", 0)
                    seen[f"{name}@v{v}"] += 1
        except (IntegrityError, StoreError) as e:
            errors.append(" ".join(str(e).split()))
        except Exception as e:  # anything else is a reader seeing a half-published version
            errors.append(f"{type(e).__name__}: {e}")
        time.sleep(0.05)


def test_concurrent_builds_of_same_and_different_specs_with_readers(store_root, samples, tmp_path):
    url, opts = store_root
    if opts is None:
        os.makedirs(url)  # the readers start before any build has created the root
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "builder.py"
    script.write_text(BUILDER.format(repo=repo))
    # three specs of one name (seeds 1-3), each built by two processes at once, and a second name beside them
    jobs = [("conc", 1), ("conc", 1), ("conc", 2), ("conc", 2), ("conc", 3), ("conc", 3), ("other", 1)]
    go = time.time() + 8.0
    procs = []
    for k, (name, seed) in enumerate(jobs):
        arg = tmp_path / f"job{k}.pkl"
        arg.write_bytes(pickle.dumps((faults.small_ct_spec(name, seed=seed), samples, url, opts, go)))
        procs.append(subprocess.Popen([sys.executable, str(script), str(arg), f"proc-{k}"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    stop, seen, errors = threading.Event(), {}, []
    reader = threading.Thread(target=_reader, args=(url, opts, stop, seen, errors), daemon=True)
    reader.start()
    outs = [p.communicate(timeout=600) for p in procs]
    stop.set()
    reader.join(timeout=120)
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]

    by_spec: dict[tuple, set] = {}
    for r in results:
        by_spec.setdefault((r["name"], r["seed"]), set()).add(r["version"])
    assert all(len(v) == 1 for v in by_spec.values()), by_spec  # the same spec: one shared version
    conc = sorted(v.pop() for (n, _), v in by_spec.items() if n == "conc")
    assert conc == [1, 2, 3]  # distinct and gap-free
    st = DatasetStore(url, opts)
    assert st.versions("conc") == [1, 2, 3] and st.versions("other") == [1]
    assert errors == [], errors[:5]  # no reader ever saw a half-published version
    assert sum(seen.values()) >= 1
    for ref in ("conc@v1", "conc@v2", "conc@v3", "other@v1"):
        rep = verify_version(ref, url, opts)
        assert rep.ok and rep.files_checked == 3 * 4 + 2, (ref, rep.problems)
    seeds = {st.manifest("conc", v).spec["seed"] for v in (1, 2, 3)}
    assert seeds == {1, 2, 3}
    # no staging left behind, every reservation matches a published version
    assert st.root.listdir_names(st.root.join("conc", "_staging")) == []
    assert st.root.listdir_names(st.root.join("conc", "_versions")) == ["v1.json", "v2.json", "v3.json"]
