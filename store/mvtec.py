"""Export samples in the MVTec AD folder layout, so anomaly-detection code written for MVTec AD reads pairforge
output (surface defects, or any version of 8-bit images whose findings are the anomalies) unchanged:

    <dest>/<class>/train/good/<id>.png
    <dest>/<class>/test/good/<id>.png
    <dest>/<class>/test/<defect>/<id>.png
    <dest>/<class>/ground_truth/<defect>/<id>_mask.png      (uint8, 0 = good, 255 = defect)

Rules: defect-free samples of the train and val splits go to ``train/good``, defect-free test samples to
``test/good`` (no mask, as in MVTec AD). Every sample with a defect goes to ``test/<defect>`` whatever its split
(anomaly detectors train on good parts only); ``<defect>`` is the defect kind, or ``combined`` when a sample holds
several kinds (MVTec AD's own name for that). Samples that failed QC are left out unless ``include_failed``.
Images are copied byte for byte from a published version (watermark and provenance chunk kept), read through the
verified reader (a file whose sha256 does not match fails the export, naming it); from in-memory samples they are
encoded as 8-bit PNG. The mask is every finding's pixels (instance map > 0), so nothing here depends on a domain;
images stored with the ``u8`` codec (8-bit grey or RGB) are required. The export is written beside ``dest`` and moved into place at the end:
nothing half-written is ever visible. Registered as export format ``mvtec`` (``pairforge export mvtec``).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from schemas.errors import SpecError
from store import codec, codecs
from store.export import Option, export_version, finding_kinds, register_exporter, selected, staged_folder
from store.read import VersionDataset

COMBINED = "combined"


def defect_type(kinds: Iterable[str]) -> str | None:
    ks = sorted(set(kinds))
    if not ks:
        return None
    return ks[0] if len(ks) == 1 else COMBINED


def _records_from_samples(samples: Iterable[Any]) -> Iterator[dict[str, Any]]:
    for s in samples:
        image = np.asarray(s.image)
        if image.dtype != np.uint8:
            raise SpecError(f"sample {s.sample_id} has a {image.dtype} image; the MVTec AD layout holds 8-bit images")
        yield {"sample_id": s.sample_id, "split": s.split, "kinds": [f["kind"] for f in s.requested],
               "passed": bool(s.qc.get("passed", True)),
               "image": lambda image=image: codec.encode_png(image), "mask": lambda s=s: _mask(np.asarray(s.instance))}


def _mask(instance: np.ndarray) -> np.ndarray:
    """0/255 uint8 mask of every finding (instance id > 0): the anomalous pixels, whatever the domain."""
    return np.where(instance > 0, 255, 0).astype(np.uint8)


# The codec whose stored files are the images themselves as 8-bit grey or RGB PNGs: what MVTec AD loaders read.
COPYABLE_CODEC = "u8"


def _records_from_version(version: VersionDataset, indices: Iterable[int]) -> Iterator[dict[str, Any]]:
    """Records read through the verified reader: every file's sha256 is checked as it is read."""
    for i in indices:
        row = version.row(i)

        def image(i=i) -> bytes:
            return version.file_bytes(i, "image")

        yield {"sample_id": row["sample_id"], "split": row["split"], "kinds": finding_kinds(row),
               "passed": bool((row.get("qc") or {}).get("passed", True)), "image": image,
               "mask": lambda i=i: _mask(codec.decode_png(version.file_bytes(i, "instance")))}


def _check_codecs(version: VersionDataset, indices: Iterable[int]) -> None:
    """Images are copied byte for byte, so every selected sample must be stored with the ``u8`` codec."""
    for i in indices:
        row = version.row(i)
        c = codecs.codec_for_row(row)
        if c.name != COPYABLE_CODEC:
            raise SpecError(f"{version.ref} stores its images with codec {c.name!r} ({row['image_encoding']}); the "
                            f"MVTec AD layout holds 8-bit grey or RGB images (codec {COPYABLE_CODEC!r})")


def _check_class_name(class_name: str) -> None:
    if not class_name or "/" in class_name or os.sep in class_name or class_name.startswith("."):
        raise SpecError(f"class name {class_name!r} is not a folder name; use e.g. 'brushed_plate'")


def _write(records: Iterable[dict[str, Any]], final: Path, src_desc: str, *, include_failed: bool,
           overwrite: bool) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    skipped = 0
    with staged_folder(final, overwrite=overwrite) as tmp:
        for r in records:
            if not r["passed"] and not include_failed:
                skipped += 1
                continue
            dtype = defect_type(r["kinds"])
            sid = r["sample_id"]
            folder = ("train/good" if r["split"] in ("train", "val") else "test/good") if dtype is None \
                else f"test/{dtype}"
            out = tmp / folder
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{sid}.png").write_bytes(r["image"]())
            if dtype is not None:
                gt = tmp / "ground_truth" / dtype
                gt.mkdir(parents=True, exist_ok=True)
                (gt / f"{sid}_mask.png").write_bytes(codec.encode_png(r["mask"]()))
            counts[folder] += 1
        for must in ("train/good", "test/good"):
            (tmp / must).mkdir(parents=True, exist_ok=True)
        summary = {"class_dir": str(final), "path": str(final), "counts": dict(sorted(counts.items())),
                   "skipped_failed": skipped, "source": src_desc, "layout": "MVTec AD", "mask_values": [0, 255]}
        (tmp / "pairforge_export.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    return summary


@register_exporter("mvtec", summary="MVTec AD folder layout for anomaly detection: DEST/<class_name>/train/good, "
                   "test/<defect>, ground_truth/<defect>/<id>_mask.png",
                   options={"class_name": Option(str, "the class folder under DEST (default: the dataset name)"),
                            "include_failed": Option(bool, "also export samples that failed QC", False)})
def export_version_mvtec(version: VersionDataset, dest: Path, *, split: Sequence[str] | None = None,
                         classes: Sequence[str] | None = None, overwrite: bool = False, class_name: str | None = None,
                         include_failed: bool = False) -> dict[str, Any]:
    """A published version as MVTec AD class ``class_name`` under ``dest``; images copied byte for byte."""
    class_name = class_name or version.name
    _check_class_name(class_name)
    indices = selected(version, split, classes)
    _check_codecs(version, indices)
    records = _records_from_version(version, indices)
    return _write(records, Path(dest) / class_name, version.ref, include_failed=include_failed, overwrite=overwrite)


def _version_ref(source: Any, root: str | os.PathLike | None) -> tuple[Any, str]:
    """(root, name@vN) for a version folder (``.../<name>/v<N>``) or a ``name@vN`` reference under ``root``."""
    p = Path(source)
    if p.is_dir() or "@" not in str(source) and (root is None or "/" in str(source)):
        if not (p / "samples.parquet").is_file() or not re.fullmatch(r"v[0-9]+", p.name):
            raise SpecError(f"{str(source)!r} is not a published pairforge version (no samples.parquet); give a "
                            "version folder such as datasets/<name>/v1, a reference name@vN, or a list of samples")
        return p.parent.parent, f"{p.parent.name}@{p.name}"
    return root, str(source)


def export_mvtec(source: Any, dest: str | os.PathLike, class_name: str, *, root: str | os.PathLike | None = None,
                 include_failed: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Write ``source`` (a published version folder, a ``name@vN`` reference under ``root``, or a list of
    ``Sample``s with 8-bit images) as MVTec AD class ``class_name`` under ``dest``. A published version is read
    through the verified reader (``export_version(root, ref, "mvtec", ...)``). Returns a summary {class_dir,
    counts {folder: n}, skipped_failed}."""
    _check_class_name(class_name)
    if isinstance(source, (str, os.PathLike)):
        where, ref = _version_ref(source, root)
        return export_version(where, ref, "mvtec", dest, overwrite=overwrite, class_name=class_name,
                              include_failed=include_failed)
    return _write(_records_from_samples(source), Path(dest) / class_name, "in-memory samples",
                  include_failed=include_failed, overwrite=overwrite)
