"""NIfTI-1 (.nii.gz) encoding of chest-CT volumes: RAS+ affine, int16 HU / uint8 labels, deterministic bytes.

Orientation: the array is stored (i, j, k) = (column, row, slice). The affine maps voxels to RAS+ mm (NIfTI's
convention): i runs to the patient's left (R decreases), j posterior (A decreases), k inferior (S decreases).
qform and sform both carry it (code 1, scanner). The gzip stream has mtime 0 and no file name, level 1,
so the same array gives the same bytes anywhere.
"""
from __future__ import annotations

import gzip
import io
import json
import zlib
from typing import Any

import nibabel as nib
import numpy as np

NIFTI_LEVEL = 1


def to_nifti_image(array_kji: np.ndarray, affine_ras: np.ndarray, description: str = "",
                   extension: dict[str, Any] | None = None) -> nib.Nifti1Image:
    data = np.asarray(array_kji).transpose(2, 1, 0)  # (i, j, k), Fortran-contiguous view of a C array
    img = nib.Nifti1Image(data, affine_ras)
    hdr = img.header
    hdr.set_qform(affine_ras, code=1)
    hdr.set_sform(affine_ras, code=1)
    hdr.set_xyzt_units("mm")
    hdr.set_data_dtype(data.dtype)
    if data.dtype == np.int16:
        hdr["scl_slope"], hdr["scl_inter"] = 1.0, 0.0
        hdr["cal_min"], hdr["cal_max"] = -1024, 3071
    hdr["descrip"] = description[:79].encode()
    if extension:
        hdr.extensions.append(nib.nifti1.Nifti1Extension("comment", json.dumps(extension, sort_keys=True).encode()))
    return img


def nifti_bytes(array_kji: np.ndarray, affine_ras: np.ndarray, description: str = "",
                extension: dict[str, Any] | None = None) -> bytes:
    """The .nii.gz bytes of ``array_kji`` (deterministic)."""
    arr = np.ascontiguousarray(array_kji)
    img = to_nifti_image(arr, affine_ras, description, extension)
    hdr = img.header
    hdr.set_data_offset(hdr.get_data_offset())
    head = io.BytesIO()
    hdr.write_to(head)  # header, extensions and padding up to vox_offset
    head_bytes = head.getvalue()
    pad = int(hdr["vox_offset"]) - len(head_bytes)
    # (i, j, k) Fortran order == the C order of the [k, j, i] array: no copy, no transpose
    z = zlib.compressobj(NIFTI_LEVEL, zlib.DEFLATED, 31)  # gzip wrapper: mtime 0, no file name
    parts = [z.compress(head_bytes + b"\0" * max(0, pad))]
    flat = arr.reshape(-1).view(np.uint8)
    step = 1 << 24
    for i in range(0, flat.size, step):
        parts.append(z.compress(flat[i:i + step]))
    parts.append(z.flush())
    return b"".join(parts)


def read_nifti(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(array in [k, j, i] order, RAS affine) from .nii.gz bytes."""
    img = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    return np.asanyarray(img.dataobj).transpose(2, 1, 0), img.affine


# ---------------------------------------------------------------- the store codec
from store import watermark as wm  # noqa: E402
from store.codecs import Codec, register_codec  # noqa: E402


@register_codec
class NiftiHU(Codec):
    """Chest-CT volumes: float HU [k, j, i] -> int16 HU in a .nii.gz (RAS+ affine from ``text['affine_ras']``,
    the provenance JSON in a NIfTI comment extension). Watermark per axial slice: every slice carries the full
    payload (same pattern as the 2D CT codec, at most 4 HU, findings untouched), so any one slice, or a stack
    of them, identifies the dataset, sample and version."""

    name, version = "nifti_hu16", 1
    suffix = ".nii.gz"
    manifest_description = "int16 NIfTI-1 (.nii.gz) of HU, RAS+ affine, watermark per axial slice"
    watermark_levels = wm.CT_AMPLITUDE_HU

    def encode(self, image: np.ndarray) -> np.ndarray:
        if image.ndim != 3:
            raise ValueError(f"nifti_hu16 images are volumes [slices, rows, columns], not {image.shape}")
        return np.clip(np.rint(image), -1024, 3071).astype(np.int16)

    def decode(self, stored: np.ndarray) -> np.ndarray:
        return stored.astype(np.float32)

    def watermark(self, stored: np.ndarray, payload: wm.Payload, keep_out: np.ndarray | None) -> np.ndarray:
        out = np.empty_like(stored)
        for k in range(stored.shape[0]):
            u = (stored[k].astype(np.int32) + 1024).astype(np.uint16)
            ko = None if keep_out is None else keep_out[k]
            out[k] = (wm.embed(u, payload, keep_out=ko, amplitude=self.watermark_levels).astype(np.int32) - 1024)
        return out

    def to_bytes(self, stored: np.ndarray, text: dict[str, Any] | None = None) -> bytes:
        text = dict(text or {})
        aff = np.asarray(text.pop("affine_ras", np.eye(4)), float)
        return nifti_bytes(stored, aff, "pairforge synthetic chest CT (HU)", text or None)

    def from_bytes(self, data: bytes) -> np.ndarray:
        return read_nifti(data)[0]

    # ---- labels and instances: NIfTI with the same affine (uint8 class ids, uint16 instance ids); never marked
    label_suffix = ".nii.gz"
    label_encoding = "uint8 NIfTI-1 (.nii.gz) of class ids, same affine as the image (never watermarked)"
    instance_encoding = "uint16 NIfTI-1 (.nii.gz) of finding instance ids (0 = none), same affine"
    provenance_encoding = "NIfTI comment extension (JSON) in every image .nii.gz"
    spatial_dims = 3

    def sample_context(self, sample: Any) -> dict[str, Any]:
        aff = ((sample.params or {}).get("layout") or {}).get("affine_ras")
        if aff is None:
            raise ValueError(f"sample {sample.sample_id}: a nifti_hu16 volume needs params.layout.affine_ras")
        return {"affine_ras": [[float(v) for v in r] for r in aff]}

    def keep_out(self, instance: np.ndarray) -> np.ndarray | None:
        if not np.any(instance):
            return None
        return np.stack([np.zeros(s.shape, bool) if not s.any() else wm.keep_out_mask(s) for s in instance])

    def label_to_bytes(self, label: np.ndarray, context: dict[str, Any] | None = None) -> bytes:
        aff = np.asarray((context or {}).get("affine_ras", np.eye(4)), float)
        return nifti_bytes(np.asarray(label, np.uint8), aff, "pairforge chest CT labels (class ids)")

    def instance_to_bytes(self, instance: np.ndarray, context: dict[str, Any] | None = None) -> bytes:
        aff = np.asarray((context or {}).get("affine_ras", np.eye(4)), float)
        return nifti_bytes(np.asarray(instance, np.uint16), aff, "pairforge chest CT finding instances")

    def map_from_bytes(self, data: bytes) -> np.ndarray:
        return read_nifti(data)[0]

    def read_meta(self, data: bytes) -> tuple[np.ndarray, dict[str, Any]]:
        arr, aff = read_nifti(data)
        return arr, {"affine": np.asarray(aff, np.float64)}

    def plane_shape(self, stored: np.ndarray) -> tuple[int, int, int]:
        return int(stored.shape[1]), int(stored.shape[2]), 1
