"""Verifying one image: recover dataset, version and sample from the watermark alone (also on windowed, JPEG'd,
rescaled or cropped copies), read the iTXt provenance if the file still has it, and, when the root is
reachable, say whether the file and its pixels still match what the version stored.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from store import codec
from store import watermark as wm
from store.build import published_versions
from store.errors import StoreError
from store.read import list_dataset_names, read_index, read_manifest
from store.root import Root


@dataclass
class ImageVerification:
    path: str
    watermark_found: bool
    payload: str | None = None  # 16 hex digits
    dataset_id: str | None = None  # 6 hex digits
    dataset: str | None = None  # resolved through the root
    version: int | None = None
    index: int | None = None
    sample_id: str | None = None
    sync_score: float = 0.0
    scale: float | None = None
    rotation: float | None = None  # estimated rotation of the copy, degrees
    scheme: int | None = None  # watermark scheme version that decoded (3; 2 or 1 for older versions)
    slices: str | None = None  # NIfTI volumes: "k of n slices read carry this payload"
    provenance: dict[str, Any] | None = None  # the iTXt chunk, when the file still has it
    file_matches: bool | None = None  # sha256 of the file == the stored image's (None: root not reachable)
    pixels_match: bool | None = None  # decoded pixels == the stored image's pixels
    notes: list[str] = field(default_factory=list)
    tampered: bool = False  # the mark contradicts the dataset's own record of this sample

    @property
    def verdict(self) -> str:
        """intact | re-encoded | modified copy | identified (not compared: no root) | tampered | no mark."""
        if not self.watermark_found:
            return "no mark"
        if self.tampered:
            return "tampered"
        if self.file_matches:
            return "intact"
        if self.pixels_match:
            return "re-encoded"
        if self.file_matches is False:
            return "modified copy"
        return "identified"

    @property
    def identified(self) -> bool:
        """The mark names a dataset version and sample and nothing contradicts it (``pairforge verify`` exits 0)."""
        return self.verdict in ("intact", "re-encoded", "modified copy", "identified")

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {**asdict(self), "ref": self.ref, "verdict": self.verdict, "identified": self.identified}

    @property
    def ref(self) -> str | None:
        if self.dataset is None or self.version is None:
            return None
        return f"{self.dataset}@v{self.version}"

    def __str__(self) -> str:
        if not self.watermark_found:
            return f"{self.path}: no pairforge watermark found" + (f" ({'; '.join(self.notes)})" if self.notes else "")
        who = self.ref or f"dataset id {self.dataset_id}, version {self.version}"
        s = f"{self.path}: watermark of {who}, sample {self.sample_id or self.index}"
        if self.file_matches is not None:
            s += ("; file identical to the stored image" if self.file_matches else
                  "; pixels identical to the stored image (file re-encoded)" if self.pixels_match else
                  "; pixels differ from the stored image (a modified copy)")
        if self.notes:
            s += f" ({'; '.join(self.notes)})"
        return s


def _read_nifti(p: str, data: bytes):
    """(volume [k, j, i], provenance JSON or None) of a .nii / .nii.gz file."""
    import gzip
    import json

    import nibabel as nib

    try:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        img = nib.Nifti1Image.from_bytes(raw)
        vol = np.asanyarray(img.dataobj).transpose(2, 1, 0)  # [k, j, i]: axial slices first
    except Exception as e:  # noqa: BLE001 - any unreadable file is one readable line
        raise StoreError(f"{p!r} is not a readable NIfTI volume ({type(e).__name__}: {e})") from None
    if vol.ndim != 3 or min(vol.shape) < 1:
        raise StoreError(f"{p!r} is a NIfTI image of shape {vol.shape}; verify reads 3D volumes of axial slices")
    prov = None
    for ext in img.header.extensions:
        try:
            prov = json.loads(ext.get_content())
            break
        except (ValueError, TypeError, UnicodeDecodeError):
            continue
    return vol, prov


def _decode_nifti(p: str, data: bytes, agree: int = 3):
    """A NIfTI volume, watermarked per axial slice: decode slices from the middle outwards until ``agree`` slices
    give the same payload (each accepted slice passed the sync threshold and the keyed check on its own)."""
    vol, prov = _read_nifti(p, data)
    n = vol.shape[0]
    order = sorted(range(n), key=lambda k: abs(k - (n - 1) / 2))
    found: dict[str, list] = {}
    best, tried = None, 0
    for k in order:
        det = wm.decode(vol[k].astype(np.float32))  # linear detector: HU or HU + 1024 read the same
        tried += 1
        if det.found:
            found.setdefault(det.payload.hex, []).append(det)
            if len(found[det.payload.hex]) >= agree:
                break
        elif best is None or det.sync_score > best.sync_score:
            best = det
    if not found:
        return vol, best, f"0 of {tried} slices read carry a mark", prov
    top = max(found, key=lambda h: len(found[h]))
    return vol, found[top][0], f"{len(found[top])} of {tried} slices read carry this payload", prov


def verify_image_file(path: str | os.PathLike, root: Root | None) -> ImageVerification:
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise StoreError(f"image {p!r} does not exist") from None
    except IsADirectoryError:
        raise StoreError(f"image path {p!r} is a folder; give an image file (PNG, JPEG, ...)") from None
    if p.lower().endswith((".nii.gz", ".nii")):
        pixels, det, slices, prov = _decode_nifti(p, data)
    else:
        try:
            pixels = codec.decode_png(data)
        except Exception:  # noqa: BLE001 - ValueError, or cv2.error for an empty or truncated buffer
            raise StoreError(f"{p!r} is not an image OpenCV can read (PNG, JPEG, TIFF, ...) "
                             "nor a NIfTI volume (.nii, .nii.gz)") from None
        det, slices, prov = wm.decode(pixels), None, codec.read_itxt(data)
    out = ImageVerification(p, det.found, sync_score=round(det.sync_score, 2), scale=round(det.scale, 4),
                            rotation=round(det.rotation, 2), scheme=det.scheme if det.found else None,
                            slices=slices, provenance=prov)
    if slices:
        out.notes.append(slices)
    if det.found and det.scheme == 1:
        out.notes.append("an older scheme-v1 mark (16-bit CRC, accepted with a pilot correlation >= "
                         f"{wm.SYNC_THRESHOLD_V1:g} sd)")
    if not det.found:
        if out.provenance:
            out.notes.append("the PNG's provenance chunk names "
                             f"{out.provenance.get('dataset')}@v{out.provenance.get('version')} sample "
                             f"{out.provenance.get('sample_id')}, but the pixels carry no readable mark")
        return out
    pl = det.payload
    out.payload, out.dataset_id, out.version, out.index = pl.hex, f"{pl.dataset_id:06x}", pl.version, pl.index
    if root is None:
        out.notes.append("no dataset root given: the dataset is known only by its id")
        return out
    try:
        names = [n for n in list_dataset_names(root) if wm.dataset_id(n) == pl.dataset_id]
    except StoreError as e:
        out.notes.append(f"root not reachable: {e}")
        return out
    names = [n for n in names if pl.version in published_versions(root, n)]
    if not names:
        out.notes.append(f"no dataset at {root.url} carries id {out.dataset_id} with version {pl.version}")
        return out
    if len(names) > 1:
        out.notes.append(f"dataset id {out.dataset_id} is shared by {', '.join(names)}; reporting {names[0]}")
    out.dataset = names[0]
    manifest = read_manifest(root, out.dataset, pl.version)
    table = read_index(root, out.dataset, pl.version, manifest)
    recorded = getattr(getattr(manifest, "watermark", None), "scheme", None) or ""
    if det.scheme in (1, 2) and recorded and not recorded.startswith(f"pairforge-ss-v{det.scheme}"):
        out.tampered = True
        out.notes.append(f"a scheme-v{det.scheme} mark, but {out.ref} was marked with {recorded.split(' ')[0]}")
    rows = table.filter(np.array(table.column("index").to_pylist()) == pl.index).to_pylist()
    if not rows:
        out.notes.append(f"{out.ref} has no sample {pl.index}")
        return out
    row = rows[0]
    out.sample_id = row["sample_id"]
    if row["watermark_payload"] != pl.hex:
        out.tampered = True
        out.notes.append(f"the index records payload {row['watermark_payload']} for this sample, not {pl.hex}")
    out.file_matches = codec.sha256(data) == row["image_sha256"]
    if out.file_matches:
        out.pixels_match = True
    else:
        blob = root.read_bytes(root.join(out.dataset, f"v{pl.version}", row["image_path"]))
        if p.lower().endswith((".nii.gz", ".nii")):
            stored = _read_nifti(p, blob)[0] if str(row["image_path"]).endswith(".nii.gz") else None
        else:
            stored = codec.decode_png(blob)
        out.pixels_match = stored is not None and stored.shape == pixels.shape and stored.dtype == pixels.dtype and bool(
            np.array_equal(stored, pixels))
    return out
