"""Export a published version as COCO instance segmentation, loadable with ``pycocotools.coco.COCO``::

    <dest>/<name>_v<N>/images/<sample_id>.png                  (the published image files, byte for byte)
    <dest>/<name>_v<N>/annotations/instances_<split>.json      (one file per split)
    <dest>/<name>_v<N>/README.md, PROVENANCE.json

One category per finding (defect) kind present in the version, ids 1, 2, ... in name order (the same in every split's
file). One annotation per finding: its instance mask as compressed RLE (pycocotools ``mask.encode``, so
``COCO.annToMask`` returns exactly the instance map's pixels for that instance), ``area`` in pixels, ``bbox``
[x, y, w, h], ``iscrowd`` 0, plus ``pairforge_instance`` (the id in the instance map) and the finding's measured
values (``measured``, in mm). Image entries carry ``pixel_spacing_mm``, ``split``, ``sample_id``, the QC verdict
and the image codec (CT images are 16-bit PNGs of HU + 1024: decode them as the codec says).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from store.export import Option, finding_kinds, register_exporter, exported, staged_folder
from store.export_meta import instance_array, write_provenance
from store.read import VersionDataset


def categories(version: VersionDataset) -> list[dict[str, Any]]:
    kinds = sorted({k for i in range(len(version)) for k in finding_kinds(version.row(i))})
    return [{"id": n + 1, "name": k, "supercategory": version.manifest.domain} for n, k in enumerate(kinds)]


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


@register_exporter("coco", summary="COCO instance segmentation: images/ + annotations/instances_<split>.json "
                   "(RLE masks, one category per finding kind)",
                   options={"include_failed": Option(bool, "also export samples that failed QC", False)})
def export_coco(version: VersionDataset, dest: Path, *, split: Sequence[str] | None = None,
                classes: Sequence[str] | None = None, overwrite: bool = False,
                include_failed: bool = False) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    indices = exported(version, split, classes, include_failed)
    cats = categories(version)
    cat_id = {c["name"]: c["id"] for c in cats}
    final = Path(dest) / f"{version.name}_v{version.version}"
    per_split: dict[str, dict[str, list]] = {}
    ann_id = 0
    with staged_folder(final, overwrite=overwrite) as out:
        (out / "images").mkdir()
        (out / "annotations").mkdir()
        for i in indices:
            row = version.row(i)
            sid = row["sample_id"]
            name = f"images/{sid}{Path(row['image_path']).suffix}"
            (out / name).write_bytes(version.file_bytes(i, "image"))
            inst = instance_array(version, i)
            d = per_split.setdefault(row["split"], {"images": [], "annotations": []})
            image_id = int(row["index"]) + 1
            d["images"].append({"id": image_id, "file_name": name, "width": int(row["width"]),
                                "height": int(row["height"]), "pixel_spacing_mm": float(row["pixel_spacing_mm"]),
                                "sample_id": sid, "split": row["split"],
                                "qc_passed": bool((row.get("qc") or {}).get("passed", True)),
                                "image_codec": row.get("image_codec"), "image_encoding": row.get("image_encoding")})
            measured = {int(f["instance"]): f for f in row["measured"] if f.get("instance") is not None}
            for f in row["requested"]:
                k = int(f["instance"])
                m = inst == k
                if not m.any():
                    continue
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                ann_id += 1
                d["annotations"].append({
                    "id": ann_id, "image_id": image_id, "category_id": cat_id[f["kind"]],
                    "segmentation": {"size": [int(x) for x in rle["size"]], "counts": rle["counts"].decode("ascii")},
                    "area": int(m.sum()), "bbox": [float(x) for x in mask_utils.toBbox(rle)], "iscrowd": 0,
                    "pairforge_instance": k, "measured": _jsonable(measured.get(k, {}))})
        prov = write_provenance(out, version, "coco", "COCO instance segmentation", len(indices), notes=[
            "Annotations: `annotations/instances_<split>.json`; categories are the finding kinds.",
            "Images are the published files byte for byte; `image_codec` in each image entry says how to decode "
            "them (16-bit PNG of HU + 1024 for CT, 8-bit PNG otherwise).",
        ])
        info = {"description": f"pairforge synthetic dataset {version.ref}", "version": str(version.version),
                "year": int(version.manifest.created_at[:4]), "contributor": "pairforge (synthetic)",
                "date_created": version.manifest.created_at, "manifest_sha256": prov["manifest_sha256"],
                "synthetic": True, "watermark": prov["watermark"]}
        licenses = [{"id": 1, "name": prov["license"], "url": ""}]
        counts = {}
        for s, d in sorted(per_split.items()):
            for im in d["images"]:
                im["license"] = 1
            doc = {"info": info, "licenses": licenses, "images": d["images"], "annotations": d["annotations"],
                   "categories": cats}
            (out / "annotations" / f"instances_{s}.json").write_text(json.dumps(doc))
            counts[s] = {"images": len(d["images"]), "annotations": len(d["annotations"])}
    return {"path": str(final), "counts": counts, "categories": [c["name"] for c in cats]}
