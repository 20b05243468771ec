"""Per-file sha256 of small builds of the example specs, to show a refactor changes no published byte.

    python bench/example_bytes.py record tests/fixtures/example_bytes.json   # before a change
    python bench/example_bytes.py check tests/fixtures/example_bytes.json    # after: lists every difference

Each example spec (procedural ones; the controlnet example needs a GPU and model weights) is built with its sample
count lowered to ``--samples`` through the store API with a fixed code version and the rich dataset card, so the
bytes depend on the spec and the code only. manifest.json is compared without the fields that record when, where
and with which installed libraries a build ran (created_at, run_id, git state, library versions).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

EXAMPLES = ("chest_ct_nodules.yaml", "surface_defects.yaml")
CODE = "frozen-code-version"
VOLATILE = ("created_at", "run_id", "libraries", "manifest_sha256")


def _manifest_view(data: bytes) -> str:
    m = json.loads(data)
    for k in VOLATILE:
        m.pop(k, None)
    m.get("code", {}).pop("git_commit", None)
    m.get("code", {}).pop("git_dirty", None)
    m.get("code", {}).pop("pairforge_version", None)
    return json.dumps(m, sort_keys=True)


def rows_without_codec(data: bytes) -> str:
    """samples.parquet's rows as JSON, without the image_codec column (added when codecs were recorded)."""
    import io

    import pyarrow.parquet as pq

    t = pq.read_table(io.BytesIO(data))
    if "image_codec" in t.column_names:
        t = t.drop(["image_codec"])
    if "group" in t.column_names and t.column("group").null_count == len(t):  # added for real sources; null here
        t = t.drop(["group"])
    rows = t.to_pylist()
    for row in rows:  # read from the published label since (docs/store.md): lobe, in-region share, finding_count
        for m in row.get("measured") or []:
            m.pop("lobe", None)
            m.pop("in_region_fraction", None)
        for c in (row.get("qc") or {}).get("checks") or []:
            if c.get("name", "").startswith(("in_lobe_", "finding_count")):
                c.update(value=None, threshold=None)
    return json.dumps(rows, sort_keys=True, default=str)


# Class ids appended after the recording (ids never change; new ones are added at the end): chest-CT 25-27 for
# real-scan sources (lung_right, lung_left, tissue_unlabelled).
APPENDED_CLASSES = {"chest_ct": ("25", "26", "27")}


def manifest_without_codec(data: str | bytes) -> str:
    """The manifest view without what the codec record changes: the ``codecs`` entry and the hashes that chain
    from samples.parquet (its sha256, its line in ``files``, the content digest)."""
    m = json.loads(data)
    for k in ("codecs", "samples_parquet_sha256", "content_digest"):
        m.pop(k, None)
    for k in APPENDED_CLASSES.get(m.get("domain"), ()):  # ids appended to a class table after the recording
        m.get("class_table", {}).pop(k, None)
    m.get("files", {}).pop("samples.parquet", None)
    for rel in [r for r in m.get("files", {}) if is_browser_file(r)]:
        m["files"].pop(rel)
    return json.dumps(m, sort_keys=True)


# The static browser (index.html, sample.html, browser/*) came after the recording: it is left out of the comparison
# (its own bytes are a function of the version too; tests/test_browser.py checks it).
def is_browser_file(rel: str) -> bool:
    return rel in ("index.html", "sample.html") or rel.startswith("browser/")


DERIVED = {"samples.parquet": rows_without_codec, "manifest.json": manifest_without_codec}


def build_hashes(samples: int) -> dict[str, dict[str, str]]:
    from flows.card import card
    from flows.pipeline import make_samples
    from schemas.plan import plan_shards
    from schemas.spec import load_spec_text, spec_hash
    from store import DatasetStore

    out: dict[str, dict[str, str]] = {}
    for ex in EXAMPLES:
        text = (REPO / "examples" / ex).read_text()
        text = re.sub(r"(?m)^samples: \d+", f"samples: {samples}", text)
        text = re.sub(r"(?m)^shard_size: \d+", f"shard_size: {max(1, samples // 2)}", text)
        spec = load_spec_text(text)
        digest = spec_hash(spec)
        with tempfile.TemporaryDirectory() as tmp:
            st = DatasetStore(tmp)
            b = st.open_build(spec, text, digest, CODE)
            for i, r in enumerate(plan_shards(spec.samples, spec.shard_size)):
                b.write_shard(i, make_samples(spec, r, digest=digest))
            pv = b.publish(run_id=None, card=card)
            vdir = Path(tmp) / pv.name / f"v{pv.version}"
            files = {}
            for f in sorted(vdir.rglob("*")):
                if f.is_file():
                    rel = str(f.relative_to(vdir))
                    if is_browser_file(rel):
                        continue
                    data = f.read_bytes()
                    if rel == "manifest.json":
                        data = _manifest_view(data).encode()
                    files[rel] = hashlib.sha256(data).hexdigest()
                    if rel in DERIVED:
                        files[rel + "#" + DERIVED[rel].__name__] = hashlib.sha256(DERIVED[rel](data).encode()).hexdigest()
            out[ex] = {"spec_hash": digest, "files": files}
    return out


def environment() -> dict[str, str]:
    """Versions of what shapes PNG and Parquet bytes (PNGs are written with libdeflate, the ``deflate`` package): a difference here explains byte changes the code did not make."""
    import cv2
    import deflate
    import numpy
    import pyarrow
    import scipy

    return {"opencv": cv2.__version__, "numpy": numpy.__version__, "scipy": scipy.__version__,
            "pyarrow": pyarrow.__version__, "deflate": deflate.__version__}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["record", "check"])
    ap.add_argument("path")
    ap.add_argument("--samples", type=int, default=6)
    a = ap.parse_args()
    if a.mode == "record":
        res = build_hashes(a.samples)
        Path(a.path).write_text(json.dumps({"samples": a.samples, "environment": environment(), "examples": res},
                                           indent=1, sort_keys=True) + "\n")
        print(f"recorded {sum(len(v['files']) for v in res.values())} files to {a.path}")
        return 0
    want = json.loads(Path(a.path).read_text())
    got = build_hashes(want["samples"])
    diff = 0
    if want.get("environment") and want["environment"] != environment():
        print(f"note: recorded with {want['environment']}, now {environment()}")
    for ex, w in want["examples"].items():
        g = got.get(ex, {"files": {}, "spec_hash": None})
        if g["spec_hash"] != w["spec_hash"]:
            print(f"{ex}: spec hash {w['spec_hash'][:12]} -> {g['spec_hash'][:12] if g['spec_hash'] else None}")
            diff += 1
        for f in sorted(set(w["files"]) | set(g["files"])):
            if w["files"].get(f) != g["files"].get(f):
                view = next((f"{f}#{fn.__name__}" for rel, fn in DERIVED.items() if rel == f), None)
                if view and view in w["files"] and w["files"][view] == g["files"].get(view):
                    print(f"{ex}: {f} differs only by the image codec record ({view.split('#')[1]} identical)")
                else:
                    print(f"{ex}: {f} differs")
                    diff += 1
        same = sum(1 for f in w["files"] if w["files"][f] == g["files"].get(f))
        print(f"{ex}: {same}/{len(w['files'])} files identical")
    return 1 if diff else 0


if __name__ == "__main__":
    raise SystemExit(main())
