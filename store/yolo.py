"""Export a published version of 8-bit images (surface defects and the like) as YOLO segmentation (the Ultralytics
layout industrial users train with)::

    <dest>/<name>_v<N>/data.yaml                           (path, train/val/test folders, names: {id: kind})
    <dest>/<name>_v<N>/images/<split>/<sample_id>.png      (the published files, byte for byte)
    <dest>/<name>_v<N>/labels/<split>/<sample_id>.txt      (one line per finding part: class x1 y1 x2 y2 ...)
    <dest>/<name>_v<N>/README.md, PROVENANCE.json

Class ids are the version's finding kinds in name order, from 0. Each finding's instance mask is traced with
OpenCV (outer contours, every boundary pixel kept); a finding in several pieces gives one line per piece.
Coordinates are the boundary pixels' centres divided by the image width and height (0..1, six decimals); filling
the polygon back (``cv2.fillPoly`` at the same scale) gives the mask again up to sub-pixel rounding. A defect-free
sample gets an empty label file (a background image to YOLO). Images must be 8-bit (codec ``u8``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from schemas.errors import SpecError
from store import codecs
from store.export import Option, finding_kinds, register_exporter, exported, staged_folder
from store.export_meta import instance_array, write_provenance
from store.read import VersionDataset


def polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Outer boundaries of a boolean mask's pieces, each an (N, 2) array of (x, y) pixel coordinates."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return [c.reshape(-1, 2) for c in contours if len(c) >= 1]


def _line(cls: int, poly: np.ndarray, w: int, h: int) -> str:
    if len(poly) < 3:  # a piece one or two pixels thin: a small box around it keeps it a polygon
        x0, y0 = poly.min(0)
        x1, y1 = poly.max(0)
        poly = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    xy = (poly.astype(np.float64) / [w, h]).reshape(-1)
    return f"{cls} " + " ".join(f"{v:.6f}" for v in xy)


@register_exporter("yolo", summary="YOLO (Ultralytics) segmentation: data.yaml, images/<split>, labels/<split>/*.txt "
                   "polygons, for 8-bit images",
                   options={"include_failed": Option(bool, "also export samples that failed QC", False)})
def export_yolo(version: VersionDataset, dest: Path, *, split: Sequence[str] | None = None,
                classes: Sequence[str] | None = None, overwrite: bool = False,
                include_failed: bool = False) -> dict[str, Any]:
    import yaml

    indices = exported(version, split, classes, include_failed)
    for i in indices:
        c = codecs.codec_for_row(version.row(i))
        if c.name != "u8":
            raise SpecError(f"{version.ref} stores its images with codec {c.name!r}; the YOLO layout holds 8-bit "
                            "images (codec 'u8'); use nnunet, monai or coco for this version")
    kinds = sorted({k for i in range(len(version)) for k in finding_kinds(version.row(i))})
    cls_of = {k: n for n, k in enumerate(kinds)}
    final = Path(dest) / f"{version.name}_v{version.version}"
    counts: dict[str, int] = {}
    n_lines = 0
    with staged_folder(final, overwrite=overwrite) as out:
        for i in indices:
            r = version.row(i)
            s = r["split"]
            for sub in ("images", "labels"):
                (out / sub / s).mkdir(parents=True, exist_ok=True)
            (out / "images" / s / f"{r['sample_id']}.png").write_bytes(version.file_bytes(i, "image"))
            inst = instance_array(version, i)
            h, w = inst.shape
            lines = [_line(cls_of[f["kind"]], p, w, h)
                     for f in r["requested"] for p in polygons(inst == int(f["instance"]))]
            (out / "labels" / s / f"{r['sample_id']}.txt").write_text("".join(x + "\n" for x in lines))
            counts[s] = counts.get(s, 0) + 1
            n_lines += len(lines)
        data = {"path": ".", **{s: f"images/{s}" for s in sorted(counts)}, "names": dict(enumerate(kinds)),
                "nc": len(kinds)}
        (out / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        write_provenance(out, version, "yolo", "YOLO segmentation", len(indices), notes=[
            "Train with e.g. `yolo segment train data=data.yaml` (Ultralytics); `path: .` is this folder."])
    return {"path": str(final), "counts": counts, "polygons": n_lines, "names": kinds}
