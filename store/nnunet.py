"""Export a published version as an nnU-Net v2 raw dataset, ready for ``nnUNetv2_plan_and_preprocess -d XXX
--verify_dataset_integrity``::

    <dest>/DatasetXXX_<Name>/dataset.json
    <dest>/DatasetXXX_<Name>/imagesTr/<Name>_<sample_id>_0000.<ending>     (train and val splits)
    <dest>/DatasetXXX_<Name>/labelsTr/<Name>_<sample_id>.<ending>
    <dest>/DatasetXXX_<Name>/imagesTs/<Name>_<sample_id>_0000.<ending>     (test split)
    <dest>/DatasetXXX_<Name>/labelsTs/<Name>_<sample_id>.<ending>          (for evaluation; nnU-Net ignores it)
    <dest>/DatasetXXX_<Name>/README.md, PROVENANCE.json

File format, chosen from the decoded image (never from the domain): 8-bit images (grey or RGB) are PNGs, read by
nnU-Net's natural-image reader (RGB is one file with three channels ``R, G, B``; the image files are the
published PNGs byte for byte, watermark kept); any other image (e.g. CT in Hounsfield units) is a 2-D NIfTI
(``.nii.gz``, float32 values exactly as the codec decodes them, pixel spacing in mm in the affine, written with
nibabel). Labels are the label maps with class ids made consecutive (nnU-Net requires 0, 1, 2, ...): the class
table's ids in ascending order; ``dataset.json`` names every class (id 0 as ``background``, as nnU-Net requires)
and keeps the original ids and names under ``pairforge_label_ids`` and ``pairforge_label_names``. Samples that failed QC are left out unless ``include_failed``.

Volumes (a codec with ``spatial_dims == 3``, e.g. chest-CT volumes stored as NIfTI): the image is the published
``.nii.gz`` byte for byte (int16 HU, RAS affine with the voxel spacing, watermark and provenance extension kept) as
``imagesTr/<Name>_<id>_0000.nii.gz``; the label is written with the same affine (uint8, ids made consecutive), so
nnU-Net's readers (SimpleITK or nibabel) see the same geometry for both; the channel is named ``CT`` (nnU-Net's CT
normalisation) when the codec stores Hounsfield units.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from schemas.errors import SpecError
from store import codec, codecs
from store.export import Option, register_exporter, exported, staged_folder
from store.export_meta import consecutive_ids, image_array, label_array, remap, write_provenance
from store.read import VersionDataset

TRAIN_SPLITS = ("train", "val")


def nnunet_name(name: str) -> str:
    """A dataset name as nnU-Net folder names take it: letters and digits only ('tiny-ct' -> 'TinyCt')."""
    parts = [p for p in re.split(r"[^A-Za-z0-9]+", name) if p]
    return "".join(p[:1].upper() + p[1:] for p in parts) or "Pairforge"


def affine_2d(spacing_mm: float) -> np.ndarray:
    """RAS+ affine of a slice stored (i, j) = (column, row), as the chest-CT volumes are: i to the patient's left,
    j posterior."""
    return np.diag([-float(spacing_mm), -float(spacing_mm), 1.0, 1.0])


def nifti_2d_bytes(array_hw: np.ndarray, spacing_mm: float) -> bytes:
    """A 2-D .nii.gz of an (H, W) or (H, W, C) array, pixel spacing in the affine; deterministic bytes."""
    import gzip

    import nibabel as nib

    data = np.swapaxes(array_hw, 0, 1)
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine_2d(spacing_mm))
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_data_dtype(array_hw.dtype)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


@register_exporter("nnunet", summary="nnU-Net v2 raw dataset: DatasetXXX_Name/ with dataset.json, imagesTr, labelsTr, "
                   "imagesTs (NIfTI with spacing for CT, PNG for 8-bit images)",
                   options={"dataset_id": Option(int, "nnU-Net dataset id, 1-999 (folder DatasetXXX_Name)", 500),
                            "include_failed": Option(bool, "also export samples that failed QC", False)})
def export_nnunet(version: VersionDataset, dest: Path, *, split: Sequence[str] | None = None,
                  classes: Sequence[str] | None = None, overwrite: bool = False, dataset_id: int = 500,
                  include_failed: bool = False) -> dict[str, Any]:
    if not 1 <= int(dataset_id) <= 999:
        raise SpecError(f"option dataset_id={dataset_id} is out of range; accepted: 1 to 999")
    name = nnunet_name(version.name)
    folder = f"Dataset{int(dataset_id):03d}_{name}"
    indices = exported(version, split, classes, include_failed)
    mapping = consecutive_ids(version)
    table = version.manifest.class_table
    if codecs.codec_for_row(version.row(indices[0])).spatial_dims == 3:
        return _export_volumes(version, Path(dest) / folder, name, indices, mapping, overwrite)
    first = image_array(version, indices[0])
    natural = first.dtype == np.uint8
    ending = ".png" if natural else ".nii.gz"
    channels = {"0": "R", "1": "G", "2": "B"} if first.ndim == 3 else {"0": version.manifest.domain}
    counts = {"imagesTr": 0, "imagesTs": 0}
    with staged_folder(Path(dest) / folder, overwrite=overwrite) as out:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (out / sub).mkdir()
        for i in indices:
            row = version.row(i)
            case = f"{name}_{row['sample_id']}"
            tr = row["split"] in TRAIN_SPLITS
            img_dir, lab_dir = ("imagesTr", "labelsTr") if tr else ("imagesTs", "labelsTs")
            label = remap(label_array(version, i), mapping)
            if natural:
                (out / img_dir / f"{case}_0000.png").write_bytes(version.file_bytes(i, "image"))
                (out / lab_dir / f"{case}.png").write_bytes(codec.encode_png(label))
            else:
                s = float(row["pixel_spacing_mm"])
                (out / img_dir / f"{case}_0000.nii.gz").write_bytes(
                    nifti_2d_bytes(image_array(version, i).astype(np.float32), s))
                (out / lab_dir / f"{case}.nii.gz").write_bytes(nifti_2d_bytes(label, s))
            counts[img_dir] += 1
        dataset_json = {
            "channel_names": channels,
            # nnU-Net names label 0 "background"; the class table's own name is kept in pairforge_label_names
            "labels": {("background" if new == 0 else table[str(old)]): new for old, new in mapping.items()},
            "numTraining": counts["imagesTr"],
            "file_ending": ending,
            "name": f"{version.name} v{version.version}",
            "description": f"pairforge synthetic dataset {version.ref} (see README.md and PROVENANCE.json)",
            "licence": None,  # filled below
            "pairforge_label_ids": {str(new): old for old, new in mapping.items()},
            "pairforge_label_names": {str(new): table[str(old)] for old, new in mapping.items()},
            "pairforge_source": version.ref,
        }
        prov = write_provenance(out, version, "nnunet", "an nnU-Net v2 raw dataset", len(indices), notes=[
            f"Images: `imagesTr/` holds the train and val splits ({counts['imagesTr']}), `imagesTs/` the test split "
            f"({counts['imagesTs']}); `labelsTs/` holds the test labels for evaluation.",
            "Class ids are the class table's ids in ascending order, made consecutive "
            "(`pairforge_label_ids` in dataset.json maps them back).",
        ])
        dataset_json["licence"] = prov["license"]
        dataset_json["reference"] = f"manifest sha256 {prov['manifest_sha256']}"
        (out / "dataset.json").write_text(json.dumps(dataset_json, indent=1) + "\n")
    return {"path": str(Path(dest) / folder), "counts": counts, "file_ending": ending}


def _dataset_json(version: VersionDataset, channels: dict[str, str], mapping: dict[int, int], n_train: int,
                  ending: str) -> dict[str, Any]:
    table = version.manifest.class_table
    return {
        "channel_names": channels,
        "labels": {("background" if new == 0 else table[str(old)]): new for old, new in mapping.items()},
        "numTraining": n_train,
        "file_ending": ending,
        "name": f"{version.name} v{version.version}",
        "description": f"pairforge synthetic dataset {version.ref} (see README.md and PROVENANCE.json)",
        "licence": None,
        "pairforge_label_ids": {str(new): old for old, new in mapping.items()},
        "pairforge_label_names": {str(new): table[str(old)] for old, new in mapping.items()},
        "pairforge_source": version.ref,
    }


def _export_volumes(version: VersionDataset, final: Path, name: str, indices: list[int], mapping: dict[int, int],
                    overwrite: bool) -> dict[str, Any]:
    """3-D samples: the published image NIfTI as is, the label re-written (consecutive ids) with the same affine."""
    from store.nifti import nifti_bytes

    c0 = codecs.codec_for_row(version.row(indices[0]))
    hu = "HU" in (c0.manifest_description or "") or "hounsfield" in (c0.manifest_description or "").lower()
    channels = {"0": "CT" if hu else version.manifest.domain}
    counts = {"imagesTr": 0, "imagesTs": 0}
    spacing: list[float] = []
    with staged_folder(final, overwrite=overwrite) as out:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (out / sub).mkdir()
        for i in indices:
            row = version.row(i)
            c = codecs.codec_for_row(row)
            case = f"{name}_{row['sample_id']}"
            img_dir, lab_dir = ("imagesTr", "labelsTr") if row["split"] in TRAIN_SPLITS else ("imagesTs", "labelsTs")
            img_bytes = version.file_bytes(i, "image")
            _, meta = c.read_meta(img_bytes)
            affine = np.asarray(meta["affine"], np.float64)
            label = remap(c.map_from_bytes(version.file_bytes(i, "label")), mapping)
            (out / img_dir / f"{case}_0000.nii.gz").write_bytes(img_bytes)
            (out / lab_dir / f"{case}.nii.gz").write_bytes(
                nifti_bytes(label, affine, f"pairforge labels of {version.ref}/{row['sample_id']}"))
            spacing = [float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(0))[::-1]]
            counts[img_dir] += 1
        dataset_json = _dataset_json(version, channels, mapping, counts["imagesTr"], ".nii.gz")
        prov = write_provenance(out, version, "nnunet", "an nnU-Net v2 raw dataset (3-D volumes)", len(indices), notes=[
            f"Volumes: `imagesTr/` holds the train and val splits ({counts['imagesTr']}), `imagesTs/` the test split "
            f"({counts['imagesTs']}); `labelsTs/` holds the test labels for evaluation.",
            "Images are the published NIfTI files (int16 HU, RAS+ affine with the voxel spacing); labels carry the "
            "same affine. Class ids are the class table's ids in ascending order, made consecutive "
            "(`pairforge_label_ids` in dataset.json maps them back).",
        ])
        dataset_json["licence"] = prov["license"]
        dataset_json["reference"] = f"manifest sha256 {prov['manifest_sha256']}"
        (out / "dataset.json").write_text(json.dumps(dataset_json, indent=1) + "\n")
    return {"path": str(final), "counts": counts, "file_ending": ".nii.gz", "dims": 3,
            "spacing_zyx_mm": spacing}
