"""``source:`` — the user's own scans as the starting point of a dataset, instead of a phantom.

This module owns the spec model and the enumeration of source *units* (one NIfTI file, one DICOM series folder,
one folder of 16-bit PNG slices). It hashes the bytes of every unit so the spec hash (and with it resume and
rebuild) covers the data, not just its path. Reading pixel data is the generators' job (generators/ct_sources.py).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
PNG_SUFFIXES = (".png",)

# Pairforge class names a user's mask value may be mapped to (see schemas.classes.CT_CLASSES); lobe and lung-side
# classes decide where findings may go.
MASK_TARGETS = ("lung_rul", "lung_rml", "lung_rll", "lung_lul", "lung_lll", "lung_right", "lung_left",
                "pulmonary_vessel", "airway_lumen", "airway_wall", "nodule_solid", "nodule_ground_glass",
                "heart", "great_vessel", "trachea_bronchus", "liver", "tissue_unlabelled")


@dataclass(frozen=True)
class SourceUnit:
    """One readable scan: ``kind`` nifti | dicom | png; ``files`` sorted; ``sha256`` over the bytes of all files."""

    kind: str
    path: str  # the file (nifti) or folder (dicom, png)
    files: tuple[str, ...]
    sha256: str

    @property
    def source_id(self) -> str:
        """A stable, non-identifying id: the start of the content hash (never a file name)."""
        return f"src-{self.sha256[:12]}"


def _is_nifti(p: Path) -> bool:
    return p.name.lower().endswith(NIFTI_SUFFIXES)


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        fh = hashlib.sha256()
        with open(f, "rb") as fp:
            for block in iter(lambda: fp.read(1 << 20), b""):
                fh.update(block)
        h.update(fh.digest())
    return h.hexdigest()


def file_sha256(path: str) -> str:
    return _hash_files([Path(path)])


def enumerate_units(path: str) -> list[SourceUnit]:
    """Source units under ``path``: a file is one unit; in a folder (searched recursively) every NIfTI file is a
    unit, and every folder directly holding DICOM files (or PNG slices) is one series. ValueError when none."""
    root = Path(os.path.expanduser(path))
    if not root.exists():
        raise ValueError(f"source.path {path!r} does not exist")
    units: list[SourceUnit] = []
    if root.is_file():
        n = root.name.lower()
        kind = "nifti" if _is_nifti(root) else "dicom" if n.endswith(DICOM_SUFFIXES) else "png" if n.endswith(
            PNG_SUFFIXES) else None
        if kind is None:
            raise ValueError(f"source.path {path!r} is not a scan; accepted: NIfTI (.nii, .nii.gz), DICOM (.dcm) or "
                             "16-bit PNG files, or a folder of them")
        return [SourceUnit(kind, str(root), (str(root),), _hash_files([root]))]
    try:
        folders = sorted([root] + [d for d in root.rglob("*") if d.is_dir()])
    except OSError as e:
        raise ValueError(f"source.path {path!r} cannot be read: {e}") from None
    for d in folders:
        files = sorted(f for f in d.iterdir() if f.is_file())
        for f in files:
            if _is_nifti(f):
                units.append(SourceUnit("nifti", str(f), (str(f),), _hash_files([f])))
        dcm = [f for f in files if f.name.lower().endswith(DICOM_SUFFIXES)]
        if dcm:
            units.append(SourceUnit("dicom", str(d), tuple(map(str, dcm)), _hash_files(dcm)))
        png = [f for f in files if f.name.lower().endswith(PNG_SUFFIXES)]
        if png:
            units.append(SourceUnit("png", str(d), tuple(map(str, png)), _hash_files(png)))
    if not units:
        raise ValueError(f"source.path {path!r} holds no scans; accepted: NIfTI (.nii, .nii.gz) files, folders of "
                         "DICOM (.dcm) series or of 16-bit PNG slices")
    return sorted(units, key=lambda u: u.path)


class CTSource(BaseModel):
    """The user's CT scans (and optional label maps) that findings are inserted into."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="a NIfTI file, DICOM series folder or PNG-slice folder, or a folder of them")
    masks: str | None = Field(None, description="folder of label maps named like the scans (NIfTI for NIfTI/DICOM "
                                                 "volumes, 8/16-bit PNG for PNG slices); same grid as the scan")
    mask_classes: dict[int, str] = Field(default_factory=dict,
                                         description="label-map value -> pairforge class name (e.g. 1: lung_rul)")
    spacing_mm: float | None = Field(None, gt=0, le=5, description="in-plane pixel spacing of PNG slices (mm)")
    slice_thickness_mm: float | None = Field(None, gt=0, le=20, description="slice spacing of PNG slices (mm)")
    png_hu_offset: float = Field(1024.0, description="PNG pixel value minus this offset is HU")
    lobes: Literal["masks", "approximate", "none"] = Field(
        "none", description="where lobes come from: the masks (needs lobe classes), an approximate geometric rule "
                            "(recorded as approximate), or none (then only left/right lung locations are honoured)")
    level: float | None = Field(None, ge=0, le=1, description="axial level (0 apex, 1 base) of single-slice scans, "
                                                              "needed for approximate lobes on them")
    content_sha256: str | None = Field(None, description="filled in by pairforge: sha256 over every source file")
    _units: list[SourceUnit] = PrivateAttr(default_factory=list)

    @field_validator("mask_classes")
    @classmethod
    def _classes(cls, v: dict[int, str]) -> dict[int, str]:
        for k, name in v.items():
            if not 0 < int(k) < 65536:
                raise ValueError(f"mask_classes key {k} is not a label value 1..65535")
            if name not in MASK_TARGETS:
                raise ValueError(f"mask_classes value {name!r} is not accepted; accepted: {', '.join(MASK_TARGETS)}")
        return v

    @model_validator(mode="after")
    def _resolve(self) -> "CTSource":
        units = enumerate_units(self.path)
        if any(u.kind == "png" for u in units) and self.spacing_mm is None:
            raise ValueError(f"source {self.path!r} has PNG slices, which carry no spacing; give source.spacing_mm")
        if self.masks is not None:
            if not Path(os.path.expanduser(self.masks)).is_dir():
                raise ValueError(f"source.masks {self.masks!r} is not a readable folder")
            if not self.mask_classes:
                raise ValueError("source.masks is given without source.mask_classes (label value -> class name)")
        lobe_names = {"lung_rul", "lung_rml", "lung_rll", "lung_lul", "lung_lll"}
        if self.lobes == "masks" and not lobe_names & set(self.mask_classes.values()):
            raise ValueError("source.lobes is 'masks' but source.mask_classes maps no lobe class (lung_rul ... "
                             "lung_lll); accepted: map lobe labels, or lobes: approximate")
        self._units = units
        h = hashlib.sha256()
        for u in units:
            h.update(u.sha256.encode())
        if self.masks is not None:
            mfiles = sorted(f for f in Path(os.path.expanduser(self.masks)).rglob("*") if f.is_file())
            h.update(_hash_files(mfiles).encode())
        self.content_sha256 = h.hexdigest()
        return self

    @property
    def units(self) -> list[SourceUnit]:
        return self._units

    def allows(self, location: str) -> bool:
        """Whether a finding location can be honoured by what this source knows of the lungs."""
        if location in ("any", "right", "left"):
            return True
        return self.lobes in ("masks", "approximate")


def unit_for_sample(index: int, n_samples: int, n_units: int) -> int:
    """Samples go to sources in contiguous blocks, so a shard reads one or two source files."""
    return min(n_units - 1, index * n_units // max(1, n_samples))
