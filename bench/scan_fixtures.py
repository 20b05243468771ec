"""Real and phantom scans written as the files users bring (NIfTI, DICOM series, 16-bit PNG slices), for the
insertion bench, the gallery and the tests.

- ``ct_small_hu()``: pydicom's real chest-CT slice (128 x 128, 0.66 mm) in HU.
- ``phantom_volume()``: a stack of pairforge phantom slices (one anatomy, consecutive levels) with its labels.
- ``write_*``: the same data as files. DICOM files are built on CT_small's own header, so they carry its patient,
  study and institution attributes (and any extra ones given): what a de-identification test needs.
"""
from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np

PHANTOM_SPACING = 0.9
PHANTOM_SIZE = 384
PHANTOM_SLICE_MM = 2.5


def ct_small_path() -> str:
    from pydicom.data import get_testdata_file

    return get_testdata_file("CT_small.dcm")


def ct_small_hu() -> tuple[np.ndarray, float]:
    import pydicom

    ds = pydicom.dcmread(ct_small_path())
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return hu, float(ds.PixelSpacing[0])


def phantom_volume(seed: int = 0, n_slices: int = 8, levels: tuple[float, float] = (0.4, 0.8),
                   size: int = PHANTOM_SIZE, spacing: float = PHANTOM_SPACING) -> tuple[np.ndarray, np.ndarray]:
    """(HU volume (Z, H, W) float32, label volume uint8 in pairforge ids) of one phantom anatomy."""
    from generators.chest_ct import draw_anatomy, draw_slice
    from generators.ct_render import draw_render_params, render_ct

    rng = np.random.default_rng(seed)
    anatomy = draw_anatomy(rng, 0.5)
    rparams = draw_render_params(rng, spacing)
    hus, labs = [], []
    for k, level in enumerate(np.linspace(levels[0], levels[1], n_slices)):
        a = {**anatomy, "level": float(level)}
        lab, lobes, _ = draw_slice(a, size, size, spacing)
        hus.append(render_ct(lab, lobes, spacing, {**rparams, "noise_seed": rparams["noise_seed"] + k}))
        labs.append(lab)
    return np.stack(hus).astype(np.float32), np.stack(labs).astype(np.uint8)


def write_nifti(path: str | Path, vol: np.ndarray, spacing: float, slice_mm: float, dtype=np.int16) -> None:
    """(Z, H, W) display-oriented volume -> NIfTI in RAS (x = -column, y = -row, z = slice)."""
    import nibabel as nib

    data = vol.transpose(2, 1, 0)  # (col, row, z)
    affine = np.diag([-spacing, -spacing, slice_mm, 1.0])
    img = nib.Nifti1Image(np.ascontiguousarray(np.rint(data).astype(dtype)), affine)
    img.header.set_zooms((spacing, spacing, slice_mm))
    nib.save(img, str(path))


def write_dicom_series(folder: str | Path, vol: np.ndarray, spacing: float, slice_mm: float,
                       extra: dict[str, str] | None = None, modality: str = "CT", shuffle_names: bool = True) -> None:
    """One CT_small-based DICOM file per slice; file names in an order unrelated to position (sorting is tested)."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(ct_small_path())
    series = generate_uid()
    z = vol.shape[0]
    order = list(range(z))[::-1] if shuffle_names else list(range(z))
    for k in range(z):
        ds = copy.deepcopy(base)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        px = np.clip(np.rint(vol[k] + 1024), 0, 65535).astype(np.uint16)
        ds.Rows, ds.Columns = px.shape
        ds.PixelRepresentation = 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = slice_mm
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-px.shape[1] * spacing / 2, -px.shape[0] * spacing / 2, k * slice_mm]
        ds.InstanceNumber = k + 1
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.Modality = modality
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        ds.PixelData = px.tobytes()
        ds.save_as(str(folder / f"img{order[k]:03d}.dcm"), enforce_file_format=True)


def write_png_slices(folder: str | Path, vol: np.ndarray) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for k, plane in enumerate(vol):
        cv2.imwrite(str(folder / f"slice{k:03d}.png"), np.clip(np.rint(plane + 1024), 0, 65535).astype(np.uint16))


LOBE_MASK_CLASSES = {12: "lung_rul", 13: "lung_rml", 14: "lung_rll", 15: "lung_lul", 16: "lung_lll",
                     17: "pulmonary_vessel", 18: "airway_lumen", 19: "airway_wall"}


def lobe_mask(labels: np.ndarray) -> np.ndarray:
    """The phantom's lobes, vessels and airways only (other tissue 0), as a user's lobe map would be."""
    return np.where(np.isin(labels, list(LOBE_MASK_CLASSES)), labels, 0).astype(np.uint8)


def write_source_folder(root: str | Path, n_phantoms: int = 2, with_ct_small: bool = True) -> dict:
    """A folder of sources: CT_small as a one-file DICOM series, phantom volumes as NIfTI, a phantom as a DICOM
    series and one as PNG slices. Returns {"scans": path, "masks": path}."""
    import shutil

    root = Path(root)
    scans, masks = root / "scans", root / "masks"
    scans.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    if with_ct_small:
        (scans / "slice_a").mkdir(exist_ok=True)
        shutil.copy(ct_small_path(), scans / "slice_a" / "0001.dcm")
    for i in range(n_phantoms):
        hu, lab = phantom_volume(seed=i, n_slices=4)
        write_nifti(scans / f"vol{i}.nii.gz", hu, PHANTOM_SPACING, PHANTOM_SLICE_MM)
        write_nifti(masks / f"vol{i}.nii.gz", lobe_mask(lab), PHANTOM_SPACING, PHANTOM_SLICE_MM, np.uint8)
    return {"scans": str(scans), "masks": str(masks)}
