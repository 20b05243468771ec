"""Image sets for evaluations: a published version (through the store's verified reader), a built-in reference set
of the domain (``Domain.reference_sets``: e.g. chest CT's ``standin`` and ``ct_small_inserted``), or a folder of NIfTI / DICOM / PNG files (with label files beside them when there are any).

Folder conventions: an image ``x.nii.gz`` / ``x.dcm`` / ``x.png`` is labelled by a file of the same stem with the
suffix ``_label``, ``_seg`` or ``_mask`` (class ids of the domain's table). NIfTI volumes give one image per axial
slice. 16-bit PNGs are pairforge's CT encoding (value - 1024 = HU); PNGs carry no pixel spacing, so a
``spacing.json`` ({"default": mm} or {stem: mm}) must sit in the folder.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from annotators.utility import LabelledSet
from schemas.errors import SpecError

LABEL_SUFFIXES = ("_label", "_seg", "_mask")
IMAGE_EXTS = (".nii.gz", ".nii", ".dcm", ".png")


@dataclass
class ImageSet:
    """Images in the domain's units with pixel spacing; labels, instances and splits where known."""

    name: str
    kind: str                                # "version", "standin" or "folder"
    domain: str | None
    images: list[np.ndarray]
    spacings: list[float]
    ids: list[str]
    labels: list[np.ndarray] | None = None
    instances: list[np.ndarray] | None = None
    splits: list[str] | None = None
    note: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    # Volumetric sets: the volumes [slices, rows, columns] with their maps and (z, row, column) spacings; then
    # ``images``/``labels``/``instances`` are their axial slices (ids "<sample>#<k>") for the 2-D measures.
    volumes: list[np.ndarray] | None = None
    volume_labels: list[np.ndarray] | None = None
    volume_instances: list[np.ndarray] | None = None
    volume_spacings: list[tuple[float, float, float]] | None = None
    volume_ids: list[str] | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def labelled_set(self, idx: list[int] | None = None) -> LabelledSet:
        if self.labels is None:
            raise SpecError(f"{self.name} has no labels")
        idx = list(range(len(self))) if idx is None else idx
        inst = self.instances or [np.zeros_like(lab, np.uint16) for lab in self.labels]
        return LabelledSet([self.images[i] for i in idx], [self.labels[i] for i in idx], [inst[i] for i in idx],
                           [self.spacings[i] for i in idx], [self.ids[i] for i in idx])

    def split_indices(self, test_fraction: float = 0.3) -> tuple[list[int], list[int]]:
        """(train, test) indices: the set's own splits when it has them (val joins train), else the last
        ``test_fraction`` of the set (deterministic)."""
        if self.volume_ids and len(self.volume_ids) >= 2:  # whole volumes to one side
            n_vol = len(self.volume_ids)
            test_vols = set(self.volume_ids[n_vol - max(1, int(round(n_vol * test_fraction))):])
            test = [i for i, s in enumerate(self.ids) if s.rsplit("#", 1)[0] in test_vols]
            return [i for i in range(len(self)) if i not in set(test)], test
        if self.splits and "test" in self.splits and any(s != "test" for s in self.splits):
            return ([i for i, s in enumerate(self.splits) if s != "test"],
                    [i for i, s in enumerate(self.splits) if s == "test"])
        n_test = max(1, int(round(len(self) * test_fraction)))
        return list(range(len(self) - n_test)), list(range(len(self) - n_test, len(self)))


def load_version(ref: str, root: str | None = None, limit: int | None = None, split: str | None = None) -> ImageSet:
    """A published version's samples, every file checked against its sha256 by the store's reader."""
    from store import DatasetStore

    from annotators.evaluation import profile_for

    ds = DatasetStore(root).load(ref, split=split, verify=True)
    n = len(ds) if limit is None else min(limit, len(ds))
    rows = [ds[i] for i in range(n)]
    if profile_for(ds.manifest.domain).volumetric:
        return _volume_set(ds, rows)
    note = ""
    if rows and rows[0]["image"].ndim == 3:  # colour images: the measures work on luminance
        for r in rows:
            r["image"] = r["image"].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        note = "colour images measured as luminance (0.299 R + 0.587 G + 0.114 B)"
    return ImageSet(name=ds.ref, kind="version", domain=ds.manifest.domain,
                    images=[r["image"].astype(np.float32) for r in rows], spacings=[float(r["spacing_mm"]) for r in rows],
                    ids=[r["sample_id"] for r in rows], labels=[r["label"] for r in rows],
                    instances=[r["instance"] for r in rows], splits=[r["split"] for r in rows],
                    note=note, meta={"generator": ds.manifest.spec.get("generator"), "samples": len(ds)})


def _volume_set(ds, rows: list[dict]) -> ImageSet:
    """A volume version: the volumes kept whole (3-D label fidelity, voxel histograms) and cut into axial slices."""
    vols, labs, insts, sps, vids = [], [], [], [], []
    images, labels, instances, spacings, ids = [], [], [], [], []
    for r in rows:
        a = np.asarray(r["affine"], float)[:3, :3] if "affine" in r else None
        sp_zyx = ((float(np.linalg.norm(a[:, 2])), float(np.linalg.norm(a[:, 1])), float(np.linalg.norm(a[:, 0])))
                  if a is not None else (float(r["spacing_mm"]),) * 3)
        v = r["image"].astype(np.float32)
        vols.append(v)
        labs.append(r["label"])
        insts.append(r["instance"])
        sps.append(sp_zyx)
        vids.append(r["sample_id"])
        for k in range(v.shape[0]):
            images.append(v[k])
            labels.append(r["label"][k])
            instances.append(r["instance"][k])
            spacings.append(sp_zyx[1])
            ids.append(f"{r['sample_id']}#{k}")
    return ImageSet(name=ds.ref, kind="version", domain=ds.manifest.domain, images=images, spacings=spacings,
                    ids=ids, labels=labels, instances=instances, splits=None,
                    note=f"{len(rows)} volumes, measured in 3-D where it matters and on their {len(images)} axial "
                         "slices otherwise",
                    meta={"generator": ds.manifest.spec.get("generator"), "samples": len(ds)},
                    volumes=vols, volume_labels=labs, volume_instances=insts, volume_spacings=sps, volume_ids=vids)


def load_builtin(domain: str, name: str, n: int, size: int, seed: int = 11) -> ImageSet:
    """The domain's built-in reference set ``name`` (``Domain.reference_sets``), ``n`` samples at ``size`` px."""
    from schemas.domain import get_domain, import_ref

    d = get_domain(domain)
    if name not in d.reference_sets:
        raise SpecError(f"--real {name!r}: domain {domain} has no built-in reference set of that name; accepted: "
                        f"{', '.join(sorted(d.reference_sets)) or 'none'} (NAME or NAME:N), a folder or NAME@vN")
    fn = import_ref(d.reference_sets[name])
    rows = fn(n, size=size, seed=seed)
    return ImageSet(name=f"{name}(seed={seed}, n={n}, size={size})", kind=name, domain=domain,
                    images=[np.asarray(r["image"], np.float32) for r in rows],
                    spacings=[float(r["spacing_mm"]) for r in rows],
                    ids=[r["sample_id"] for r in rows], labels=[r["label"] for r in rows],
                    instances=[r["instance"] for r in rows], note=getattr(fn, "note", ""))


def load_standin(domain: str, n: int, size: int, seed: int = 11) -> ImageSet:
    return load_builtin(domain, "standin", n, size, seed)


def _stem(p: Path) -> str:
    name = p.name
    for ext in IMAGE_EXTS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return p.stem


def _read_dicom(p: Path) -> tuple[list[np.ndarray], float]:
    import pydicom

    ds = pydicom.dcmread(str(p))
    arr = ds.pixel_array.astype(np.float32)
    arr = arr * float(getattr(ds, "RescaleSlope", 1.0)) + float(getattr(ds, "RescaleIntercept", 0.0))
    sp = getattr(ds, "PixelSpacing", None)
    if sp is None:
        raise SpecError(f"{p}: DICOM file has no PixelSpacing; accepted: CT images with PixelSpacing")
    return ([arr] if arr.ndim == 2 else list(arr)), float(sp[0])


def _read_nifti(p: Path, is_label: bool) -> tuple[list[np.ndarray], float]:
    import nibabel as nib

    img = nib.load(str(p))
    data = np.asanyarray(img.dataobj)
    zooms = img.header.get_zooms()
    data = data[..., None] if data.ndim == 2 else data
    if data.ndim != 3:
        raise SpecError(f"{p}: NIfTI with {data.ndim} dimensions; accepted: 2D images or 3D volumes")
    dtype = np.uint8 if is_label else np.float32
    # NIfTI arrays are (x, y, z): an axial slice as rows x columns is the transpose of data[:, :, z].
    return [np.ascontiguousarray(data[:, :, z].T).astype(dtype) for z in range(data.shape[2])], float(zooms[0])


def _read_png(p: Path) -> np.ndarray:
    import cv2

    a = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    if a is None:
        raise SpecError(f"{p}: not a readable PNG")
    return a


def load_folder(path: str, domain: str, limit: int | None = None) -> ImageSet:
    """Every NIfTI / DICOM / PNG image in ``path`` (sorted by name), with labels where a label file exists."""
    folder = Path(path)
    if not folder.is_dir():
        from schemas.domain import get_domain

        sets = ", ".join(f"{k}[:N]" for k in sorted(get_domain(domain).reference_sets)) or "none"
        raise SpecError(f"--real {path!r} is neither a folder, a dataset version NAME@vN, nor a built-in reference "
                        f"set of {domain} ({sets})")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTS))
    label_files = {_stem(p)[: -len(s)]: p for p in files for s in LABEL_SUFFIXES if _stem(p).endswith(s)}
    image_files = [p for p in files if not any(_stem(p).endswith(s) for s in LABEL_SUFFIXES)]
    if not image_files:
        raise SpecError(f"no images in {path!r}; accepted: .nii/.nii.gz, .dcm, .png files")
    spacing_cfg = {}
    if (folder / "spacing.json").exists():
        spacing_cfg = json.loads((folder / "spacing.json").read_text())
    images, spacings, ids, labels = [], [], [], []
    for p in image_files:
        stem = _stem(p)
        low = p.name.lower()
        if low.endswith(".dcm"):
            arrs, sp = _read_dicom(p)
        elif low.endswith((".nii", ".nii.gz")):
            arrs, sp = _read_nifti(p, False)
        else:
            a = _read_png(p)
            if a.ndim != 2:
                raise SpecError(f"{p}: colour PNG; accepted: single-channel PNGs")
            arrs = [a.astype(np.float32) - 1024.0 if a.dtype == np.uint16 else a.astype(np.float32)]
            sp = spacing_cfg.get(stem, spacing_cfg.get("default"))
            if sp is None:
                raise SpecError(f"{p}: PNG carries no pixel spacing; add {folder / 'spacing.json'} with "
                                '{"default": <mm>} or {"<stem>": <mm>}')
            sp = float(sp)
        labs: list[np.ndarray | None] = [None] * len(arrs)
        if stem in label_files:
            lp = label_files[stem]
            if lp.name.lower().endswith((".nii", ".nii.gz")):
                labs, _ = _read_nifti(lp, True)
            elif lp.name.lower().endswith(".png"):
                labs = [_read_png(lp).astype(np.uint8)]
            else:
                raise SpecError(f"{lp}: label files must be NIfTI or PNG")
            if len(labs) != len(arrs) or any(lb.shape != a.shape for lb, a in zip(labs, arrs)):
                raise SpecError(f"{lp}: label shape does not match its image {p.name}")
        for z, (a, lb) in enumerate(zip(arrs, labs)):
            images.append(a)
            spacings.append(sp)
            ids.append(stem if len(arrs) == 1 else f"{stem}#{z}")
            labels.append(lb)
            if limit is not None and len(images) >= limit:
                break
        if limit is not None and len(images) >= limit:
            break
    have = [lb is not None for lb in labels]
    if any(have) and not all(have):
        missing = [i for i, h in zip(ids, have) if not h][:3]
        raise SpecError(f"{path}: some images have label files and some do not (e.g. {', '.join(missing)}); "
                        "label all of them or none")
    return ImageSet(name=os.path.abspath(path), kind="folder", domain=domain, images=images, spacings=spacings,
                    ids=ids, labels=labels if all(have) else None,
                    instances=None)


def load_reference(real: str, domain: str, size: int, root: str | None = None, limit: int | None = None
                   ) -> ImageSet:
    """``NAME`` / ``NAME:N`` (a built-in reference set of the domain, e.g. ``standin``), ``NAME@vN`` (a version),
    or a folder path."""
    from schemas.domain import get_domain

    head = real.split(":", 1)[0]
    if head in get_domain(domain).reference_sets and not os.path.exists(real):
        n = 200
        if ":" in real:
            try:
                n = int(real.split(":", 1)[1])
            except ValueError:
                raise SpecError(f"--real {real!r}: write {head} or {head}:N with N a number of samples") from None
        return load_builtin(domain, head, n if limit is None else min(n, limit), size)
    if "@" in real and not os.path.exists(real):
        return load_version(real, root, limit)
    return load_folder(real, domain, limit)


__all__ = ["ImageSet", "load_version", "load_builtin", "load_standin", "load_folder", "load_reference"]
