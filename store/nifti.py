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
