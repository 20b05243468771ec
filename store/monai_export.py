"""Export a published version as a Medical Segmentation Decathlon-style folder that MONAI reads with
``monai.data.load_decathlon_datalist`` and ``LoadImaged``::

    <dest>/<name>_v<N>/dataset.json                      ("training", "validation", "test" lists of image/label)
    <dest>/<name>_v<N>/imagesTr/<sample_id>.nii.gz       (train split)
    <dest>/<name>_v<N>/imagesVal/, imagesTs/, labelsTr/, labelsVal/, labelsTs/
    <dest>/<name>_v<N>/README.md, PROVENANCE.json

Every image and label is a 2-D NIfTI with the pixel spacing in its affine (``LoadImaged`` reports it as
``pixdim``), stored (i, j) = (column, row) as pairforge's CT volumes are: the image as the codec decodes it (HU
float32 for CT, uint8 grey or RGB (i, j, 3) otherwise), the label map with the class table's ids (uint8).
Each datalist entry also carries ``sample_id``, ``spacing_mm`` and the QC verdict.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from store.export import Option, register_exporter, exported, staged_folder
from store.export_meta import image_array, label_array, write_provenance
from store.nnunet import nifti_2d_bytes
from store.read import VersionDataset

FOLDERS = {"train": ("training", "Tr"), "val": ("validation", "Val"), "test": ("test", "Ts")}


@register_exporter("monai", summary="MONAI / Decathlon dataset.json datalist with 2-D NIfTI images and labels "
                   "(spacing in the affine)",
                   options={"include_failed": Option(bool, "also export samples that failed QC", False)})
def export_monai(version: VersionDataset, dest: Path, *, split: Sequence[str] | None = None,
                 classes: Sequence[str] | None = None, overwrite: bool = False,
                 include_failed: bool = False) -> dict[str, Any]:
    indices = exported(version, split, classes, include_failed)
    final = Path(dest) / f"{version.name}_v{version.version}"
    lists: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
    with staged_folder(final, overwrite=overwrite) as out:
        for i in indices:
            row = version.row(i)
            key, suffix = FOLDERS.get(row["split"], (row["split"], row["split"]))
            lists.setdefault(key, [])
            s = float(row["pixel_spacing_mm"])
            img = image_array(version, i)
            img = img.astype(np.float32) if img.dtype != np.uint8 else img
            for kind, arr in (("images", img), ("labels", label_array(version, i))):
                d = out / f"{kind}{suffix}"
                d.mkdir(exist_ok=True)
                (d / f"{row['sample_id']}.nii.gz").write_bytes(nifti_2d_bytes(arr, s))
            lists[key].append({"image": f"./images{suffix}/{row['sample_id']}.nii.gz",
                               "label": f"./labels{suffix}/{row['sample_id']}.nii.gz",
                               "sample_id": row["sample_id"], "spacing_mm": s,
                               "qc_passed": bool((row.get("qc") or {}).get("passed", True))})
        prov = write_provenance(out, version, "monai", "a MONAI / Decathlon-style dataset", len(indices), notes=[
            "Read with `monai.data.load_decathlon_datalist('dataset.json', True, 'training')` and `LoadImaged`.",
        ])
        m = version.manifest
        doc = {"name": f"{m.name} v{m.version}", "description": f"pairforge synthetic dataset {m.ref}",
               "reference": f"manifest sha256 {prov['manifest_sha256']}", "licence": prov["license"],
               "release": m.created_at, "tensorImageSize": "2D", "synthetic": True,
               "modality": {"0": (m.codecs or {}).get("image", {}).get("name", m.domain)},
               "labels": dict(m.class_table), "numTraining": len(lists["training"]),
               "numValidation": len(lists["validation"]), "numTest": len(lists["test"]), **lists}
        (out / "dataset.json").write_text(json.dumps(doc, indent=1) + "\n")
    return {"path": str(final), "counts": {k: len(v) for k, v in lists.items()}}
