"""Export surface samples in the MVTec AD folder layout, so anomaly-detection code written for MVTec AD reads
pairforge output unchanged:

    <dest>/<class>/train/good/<id>.png
    <dest>/<class>/test/good/<id>.png
    <dest>/<class>/test/<defect>/<id>.png
    <dest>/<class>/ground_truth/<defect>/<id>_mask.png      (uint8, 0 = good, 255 = defect)

Rules: defect-free samples of the train and val splits go to ``train/good``, defect-free test samples to
``test/good`` (no mask, as in MVTec AD). Every sample with a defect goes to ``test/<defect>`` whatever its split
(anomaly detectors train on good parts only); ``<defect>`` is the defect kind, or ``combined`` when a sample holds
several kinds (MVTec AD's own name for that). The mask is every defect class of the label map (ids 1-8); pixels
outside the part (id 255) are good. Samples that failed QC are left out unless ``include_failed``.
Images are copied byte for byte from a published version (watermark and provenance chunk kept); from in-memory
samples they are encoded as 8-bit PNG. The export is written beside ``dest`` and moved into place at the end:
nothing half-written is ever visible.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

import cv2
import numpy as np

from schemas.errors import SpecError

DEFECT_IDS = (1, 2, 3, 4, 5, 6, 7, 8)
COMBINED = "combined"


def _png(array: np.ndarray) -> bytes:
    a = array
    if a.ndim == 3:
        a = cv2.cvtColor(a, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", a, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {array.dtype} {array.shape}")
    return buf.tobytes()


def defect_mask(label: np.ndarray) -> np.ndarray:
    """0/255 uint8 mask of every defect class in a surface label map."""
    return np.where(np.isin(label, DEFECT_IDS), 255, 0).astype(np.uint8)


def defect_type(kinds: Iterable[str]) -> str | None:
    ks = sorted(set(kinds))
    if not ks:
        return None
    return ks[0] if len(ks) == 1 else COMBINED


def _records_from_samples(samples: Iterable[Any]) -> Iterator[dict[str, Any]]:
    for s in samples:
        if s.domain != "surface":
            raise SpecError(f"sample {s.sample_id} is of domain {s.domain!r}; the MVTec AD layout is for surface data")
        yield {"sample_id": s.sample_id, "split": s.split, "kinds": [f["kind"] for f in s.requested],
               "passed": bool(s.qc.get("passed", True)),
               "image": lambda s=s: _png(np.asarray(s.image)), "label": lambda s=s: np.asarray(s.label)}


def _records_from_version(version_dir: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    index = version_dir / "samples.parquet"
    if not index.is_file():
        raise SpecError(f"{str(version_dir)!r} is not a published pairforge version (no samples.parquet); give a "
                        "version folder such as datasets/<name>/v1 or a list of samples")
    table = pq.read_table(index, columns=["sample_id", "split", "domain", "image_path", "label_path", "requested",
                                          "qc"])
    for row in table.to_pylist():
        if row["domain"] != "surface":
            raise SpecError(f"{str(version_dir)!r} holds {row['domain']!r} samples; the MVTec AD layout is for "
                            "surface data")
        img_p, lab_p = version_dir / row["image_path"], version_dir / row["label_path"]

        def read_label(p=lab_p) -> np.ndarray:
            a = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            if a is None:
                raise SpecError(f"label {str(p)!r} is missing or unreadable; run `pairforge verify` on the version")
            return a

        yield {"sample_id": row["sample_id"], "split": row["split"],
               "kinds": [f["kind"] for f in (row["requested"] or []) if f.get("kind")],
               "passed": bool((row.get("qc") or {}).get("passed", True)),
               "image": lambda p=img_p: p.read_bytes(), "label": read_label}


def resolve_source(source: Any, root: str | os.PathLike | None = None) -> Any:
    """A version folder path, a ``name@vN`` reference under ``root`` (local roots), or samples (returned as is)."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    p = Path(source)
    if p.is_dir() or "@" not in str(source) and (root is None or "/" in str(source)):
        return p
    from store.root import resolve_root
    from store.read import resolve_version

    r = resolve_root(root)
    name, version = resolve_version(r, str(source))
    if not r.local:
        raise SpecError(f"{source}: the MVTec export reads a local folder; run `pairforge pull {name}@v{version} "
                        "DEST` first and export DEST/<name>/v<N>")
    return Path(r.version_dir(name, version))


def export_mvtec(source: Any, dest: str | os.PathLike, class_name: str, *, root: str | os.PathLike | None = None,
                 include_failed: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Write ``source`` (a published version folder, a ``name@vN`` reference under ``root``, or a list of surface
    ``Sample``s) as MVTec AD class ``class_name`` under ``dest``. Returns a summary {class_dir, counts
    {folder: n}, skipped_failed}."""
    source = resolve_source(source, root)
    if not class_name or "/" in class_name or class_name.startswith("."):
        raise SpecError(f"class name {class_name!r} is not a folder name; use e.g. 'brushed_plate'")
    dest = Path(dest)
    final = dest / class_name
    if final.exists() and not overwrite:
        raise SpecError(f"{str(final)!r} already exists; choose another class name, or replace it with "
                         "--overwrite (overwrite=True in Python)")
    if isinstance(source, (str, os.PathLike)):
        records = _records_from_version(Path(source))
        src_desc = str(source)
    else:
        records = _records_from_samples(source)
        src_desc = "in-memory samples"
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{class_name}.partial-", dir=dest))
    counts: Counter[str] = Counter()
    skipped = 0
    try:
        for r in records:
            if not r["passed"] and not include_failed:
                skipped += 1
                continue
            dtype = defect_type(r["kinds"])
            sid = r["sample_id"]
            if dtype is None:
                folder = "train/good" if r["split"] in ("train", "val") else "test/good"
                mask = None
            else:
                folder = f"test/{dtype}"
                mask = defect_mask(r["label"]())
            out = tmp / folder
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{sid}.png").write_bytes(r["image"]())
            if mask is not None:
                gt = tmp / "ground_truth" / dtype
                gt.mkdir(parents=True, exist_ok=True)
                (gt / f"{sid}_mask.png").write_bytes(_png(mask))
            counts[folder] += 1
        for must in ("train/good", "test/good"):
            (tmp / must).mkdir(parents=True, exist_ok=True)
        summary = {"class_dir": str(final), "counts": dict(sorted(counts.items())), "skipped_failed": skipped,
                   "source": src_desc, "layout": "MVTec AD", "mask_values": [0, 255]}
        (tmp / "pairforge_export.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it 0700; the class folder gets a normal folder's mode
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
