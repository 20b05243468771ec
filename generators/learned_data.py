"""Training pairs of the learned backend: a folder of image/label files read and mapped onto the domain's class table,
pairs (from a folder, or from a version that ``flows.train_data`` reads through the store) split into train and
held-out by a stable hash of each pair's id, and cached as one ``pairs.npz`` (network units) plus ``data.json``
(hashes, split, class table) in the model's working folder, which the training loops read back.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from generators.learned import to_network
from schemas.classes import class_table
from schemas.errors import SpecError
from schemas.training import TrainSpec

IMAGE_SUFFIXES = (".png", ".nii", ".nii.gz")


@dataclass
class Pairs:
    """Pairs in memory: images (raw: HU float32 or uint8), labels (uint8 domain class ids), and what they are."""

    ids: list[str]
    images: list[np.ndarray]
    labels: list[np.ndarray]
    hashes: list[str]  # sha256 of "<image sha256> <label sha256>" per pair
    image_kind: str
    spacing_mm: list[float] | None
    source: dict[str, Any] = field(default_factory=dict)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def domain_table(domain: str) -> dict[str, str]:
    try:
        return class_table(domain).as_dict()
    except KeyError as e:
        raise SpecError(str(e).strip("'\"")) from None


# ------------------------------------------------------------------------------------------------ folders
def _stem(p: Path) -> str:
    n = p.name
    for suf in (".nii.gz", ".nii", ".png"):
        if n.lower().endswith(suf):
            return n[: -len(suf)]
    return p.stem


def _read_file(p: Path, what: str) -> tuple[np.ndarray, bytes]:
    data = p.read_bytes()
    if p.name.lower().endswith((".nii", ".nii.gz")):
        try:
            import nibabel as nib
        except ImportError:
            raise SpecError(f"{p.name}: reading NIfTI needs nibabel (pip install nibabel); or give PNG pairs") from None
        arr = np.asarray(nib.load(str(p)).dataobj)
        arr = np.squeeze(arr)
        if arr.ndim != 2:
            raise SpecError(f"{p.name}: a NIfTI {what} must hold one 2D slice, not shape {arr.shape}")
        return arr.T.copy(), data  # NIfTI is (x, y): rows are y
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise SpecError(f"{p.name}: not a readable PNG {what}")
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return arr, data


def read_folder(spec: TrainSpec) -> Pairs:
    root = Path(spec.data.folder).expanduser()
    img_dir, lab_dir = root / "images", root / "labels"
    if not img_dir.is_dir() or not lab_dir.is_dir():
        raise SpecError(f"data.folder {str(root)!r} needs images/ and labels/ subfolders with files paired by name")
    imgs = {_stem(p): p for p in sorted(img_dir.iterdir()) if p.name.lower().endswith(IMAGE_SUFFIXES)}
    labs = {_stem(p): p for p in sorted(lab_dir.iterdir()) if p.name.lower().endswith(IMAGE_SUFFIXES)}
    pickles = [p.name for p in sorted(root.rglob("*")) if p.suffix.lower() in (".pkl", ".pickle", ".pt", ".npy")]
    if pickles:
        raise SpecError(f"data.folder holds {pickles[0]}: pickled or raw arrays are not read; give PNG (or NIfTI) files")
    unpaired = sorted(set(imgs) ^ set(labs))
    if unpaired:
        raise SpecError(f"data.folder: {len(unpaired)} file(s) without a partner, e.g. {unpaired[0]!r}; every image "
                        "needs a label of the same name")
    if not imgs:
        raise SpecError(f"data.folder {str(root)!r} holds no PNG/NIfTI pairs")
    table = domain_table(spec.domain)
    names_to_id = {v: int(k) for k, v in table.items()}
    if spec.data.classes is not None:
        bad = sorted(n for n in spec.data.classes.values() if n not in names_to_id)
        if bad:
            raise SpecError(f"data.classes: {', '.join(map(repr, bad))} not in the {spec.domain} class table; accepted: "
                            f"{', '.join(table.values())}")
        lut_map = {int(v): names_to_id[n] for v, n in spec.data.classes.items()}
    else:
        lut_map = {int(k): int(k) for k in table}
    lut = np.full(65536, 255, np.int32)
    for v, k in lut_map.items():
        lut[v] = k
    ids, images, labels, hashes = [], [], [], []
    kind = spec.data.image_kind
    for sid in sorted(imgs):
        img, ib = _read_file(imgs[sid], "image")
        lab, lb = _read_file(labs[sid], "label")
        if lab.ndim != 2 or not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0 or lab.max() > 65535:
            raise SpecError(f"labels/{labs[sid].name}: a label map is one channel of integer class values")
        mapped = lut[lab.astype(np.int64)]
        if (mapped == 255).any():
            unknown = sorted(set(np.unique(lab[mapped == 255]).tolist()))[:5]
            raise SpecError(f"labels/{labs[sid].name} holds value(s) {unknown} that data.classes does not map; "
                            f"mapped values: {sorted(lut_map)}")
        if img.shape[:2] != lab.shape:
            raise SpecError(f"{sid}: image {img.shape[:2]} and label {lab.shape} differ in size")
        if kind == "hu":
            if img.ndim != 2:
                raise SpecError(f"images/{imgs[sid].name}: a CT image is one channel (HU)")
            img = (img.astype(np.float32) - 1024.0) if img.dtype == np.uint16 else img.astype(np.float32)
        elif img.dtype != np.uint8:
            raise SpecError(f"images/{imgs[sid].name} is {img.dtype}; data.image_kind uint8 needs 8-bit images")
        ids.append(sid)
        images.append(img)
        labels.append(mapped.astype(np.uint8))
        hashes.append(sha256_hex(f"{sha256_hex(ib)} {sha256_hex(lb)}".encode()))
    sp = [spec.data.spacing_mm] * 2 if spec.data.spacing_mm else None
    return Pairs(ids, images, labels, hashes, kind, sp, {"folder": str(root.resolve())})


# ------------------------------------------------------------------------------------------------ split and cache
def held_out_ids(ids: list[str], fraction: float, seed: int) -> set[str]:
    """A stable held-out set: pair id hashed with the seed; the same ids whatever order or subset is read."""
    if fraction <= 0:
        return set()
    def u(i: str) -> float:
        return int(hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:12], 16) / 16 ** 12
    held = {i for i in ids if u(i) < fraction}
    if not held and len(ids) > 1:
        held = {min(ids, key=u)}
    return held


def pairs_digest(pairs: Pairs) -> str:
    """sha256 over the sorted (id, pair hash) lines: what the model was trained on, byte for byte."""
    lines = "".join(f"{i} {h}\n" for i, h in sorted(zip(pairs.ids, pairs.hashes)))
    return sha256_hex(lines.encode())


def to_arrays(pairs: Pairs, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, H, W) float32 network units and (N, H, W) uint8 labels; every pair must be at least ``size``."""
    shapes = {lab.shape for lab in pairs.labels}
    if len(shapes) != 1:
        raise SpecError(f"pairs come in {len(shapes)} sizes ({', '.join(f'{h}x{w}' for h, w in sorted(shapes)[:3])}); "
                        "give pairs of one size")
    h, w = shapes.pop()
    if min(h, w) < size:
        raise SpecError(f"pairs are {h}x{w}, smaller than the training size {size}; lower size or give larger pairs")
    x = np.stack([to_network(im, pairs.image_kind) for im in pairs.images])
    return x, np.stack(pairs.labels)


def write_prepared(pairs: Pairs, workdir: Path, size: int, held_out: float, seed: int, domain: str,
                   key: str = "", held: set[str] | None = None) -> dict[str, Any]:
    """Cache ``pairs`` for training; ``held`` names the held-out ids explicitly (else drawn by ``held_out``)."""
    x, y = to_arrays(pairs, size)
    held = held_out_ids(pairs.ids, held_out, seed) if held is None else set(held)
    train_idx = [i for i, s in enumerate(pairs.ids) if s not in held]
    if not train_idx:
        raise SpecError("data.held_out leaves no pair to train on")
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / "pairs.tmp.npz"
    np.savez(tmp, images=x, labels=y, ids=np.array(pairs.ids))
    tmp.replace(workdir / "pairs.npz")
    meta = {"key": key, "domain": domain, "classes": domain_table(domain), "image_kind": pairs.image_kind,
            "channels": int(x.shape[1]), "shape": list(x.shape[2:]), "spacing_mm": pairs.spacing_mm,
            "source": pairs.source, "pairs": len(pairs.ids), "train_ids": [pairs.ids[i] for i in train_idx],
            "held_out_ids": sorted(held), "sha256": pairs_digest(pairs),
            "pair_sha256": dict(zip(pairs.ids, pairs.hashes)), "reused": False}
    (workdir / "data.json").write_text(json.dumps(meta, indent=1))
    return meta


def load_prepared(workdir: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(meta, images, labels, train indices, held-out indices) from the cache ``prepare`` wrote."""
    meta = json.loads((workdir / "data.json").read_text())
    with np.load(workdir / "pairs.npz", allow_pickle=False) as z:
        x, y, ids = z["images"], z["labels"], [str(s) for s in z["ids"]]
    held = set(meta["held_out_ids"])
    tr = np.array([i for i, s in enumerate(ids) if s not in held], np.int64)
    ho = np.array([i for i, s in enumerate(ids) if s in held], np.int64)
    return meta, x, y, tr, ho
