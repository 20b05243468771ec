"""Data preparation of the training flow: the pairs a training spec names (a published version, read through the
store's verified reader, or a folder of image/label files), split and cached for the training loops
(``generators.learned_data``). Reused when the data section, domain, size and seed are unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from generators.learned_data import Pairs, domain_table, read_folder, sha256_hex, write_prepared
from schemas.errors import SpecError
from schemas.training import TrainSpec


def read_version(spec: TrainSpec) -> Pairs:
    from store import DatasetStore

    st = DatasetStore(spec.data.root)
    name, version = st.resolve(spec.data.version)
    m = st.manifest(name, version)
    if m.domain != spec.domain:
        raise SpecError(f"data.version {name}@v{version} holds {m.domain!r} pairs; this spec trains a {spec.domain!r} "
                        "model (a model renders the domain it was trained on)")
    table = domain_table(spec.domain)
    if m.class_table and m.class_table != table:
        diff = sorted(k for k in set(m.class_table) | set(table) if m.class_table.get(k) != table.get(k))
        raise SpecError(f"data.version {name}@v{version} uses a different {spec.domain} class table (id {diff[0]}: "
                        f"{m.class_table.get(diff[0])!r} there, {table.get(diff[0])!r} here)")
    ds = st.load(f"{name}@v{version}")
    rows = ds.table.select(["sample_id", "split", "image_sha256", "label_sha256"]).to_pylist()
    known = sorted({r["split"] for r in rows})
    bad = sorted(set(spec.data.splits) - set(known))
    if bad:
        raise SpecError(f"data.splits {', '.join(bad)} not in {name}@v{version}; splits there: {', '.join(known)}")
    ids, images, labels, hashes = [], [], [], []
    spacings = []
    for i, r in enumerate(rows):
        if r["split"] not in spec.data.splits:
            continue
        s = ds[i]  # every file checked against its sha256
        ids.append(r["sample_id"])
        images.append(s["image"])
        labels.append(s["label"])
        spacings.append(float(s["spacing_mm"]))
        hashes.append(sha256_hex(f"{r['image_sha256']} {r['label_sha256']}".encode()))
    if not ids:
        raise SpecError(f"{name}@v{version} has no pairs in splits {', '.join(spec.data.splits)}")
    kind = "hu" if np.issubdtype(images[0].dtype, np.floating) else "uint8"
    return Pairs(ids, images, labels, hashes, kind, [min(spacings), max(spacings)],
                 {"version": f"{name}@v{version}", "root": st.url, "content_digest": m.content_digest,
                  "splits": list(spec.data.splits)})


def prepare(spec: TrainSpec, workdir: Path) -> dict[str, Any]:
    """Read, map, split and cache the pairs (reused when the data section, domain and size are unchanged)."""
    workdir.mkdir(parents=True, exist_ok=True)
    key = sha256_hex(json.dumps({"data": spec.data.model_dump(mode="json"), "domain": spec.domain, "size": spec.size,
                           "seed": spec.train.seed}, sort_keys=True).encode())
    meta_path, arr_path = workdir / "data.json", workdir / "pairs.npz"
    if meta_path.is_file() and arr_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return {**meta, "reused": True}
    pairs = read_version(spec) if spec.data.version else read_folder(spec)
    return write_prepared(pairs, workdir, spec.size, spec.data.held_out, spec.train.seed, spec.domain, key)
