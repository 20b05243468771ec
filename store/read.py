"""Reading published versions: listing, manifests, the sample loader (numpy, torch, MONAI-style dicts), and
re-hashing a whole version (pull is in store/transfer.py). Readers only see versions whose manifest.json exists.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
from pydantic import ValidationError

from schemas.arrow import dumps, finding_dict
from schemas.manifest import Manifest
from store import codec
from store import codecs
from store.build import content_digest, published_versions
from store.errors import IntegrityError, StoreError
from store.root import MANIFEST, SAMPLES, Root, check_name, ensure_readable, parse_ref


# ---------------------------------------------------------------- listing and resolving
def list_dataset_names(root: Root) -> list[str]:
    ensure_readable(root)
    out = []
    for entry in root.listdir_names(root.path):
        if entry.startswith((".", "_")) or not _is_name(entry):
            continue
        if published_versions(root, entry):
            out.append(entry)
    return out


def _is_name(s: str) -> bool:
    try:
        check_name(s)
        return True
    except StoreError:
        return False


def resolve_version(root: Root, ref: str) -> tuple[str, int]:
    """``name@vN`` / ``name`` / ``name@latest`` -> (name, N) of a published version, or a one-line StoreError."""
    name, version = parse_ref(ref)
    ensure_readable(root)
    versions = published_versions(root, name)
    if not versions:
        names = list_dataset_names(root)
        there = ", ".join(names) if names else "none"
        raise StoreError(f"no dataset {name!r} at {root.url}; datasets there: {there} ({root.origin})"
                         f"{_no_manifest_note(root, name, version)}")
    if version is None:
        return name, versions[-1]
    if version not in versions:
        raise StoreError(f"dataset {name!r} has no published version {version} at {root.url}; published versions: "
                         f"{', '.join(f'v{v}' for v in versions)}{_no_manifest_note(root, name, version)}")
    return name, version


def _no_manifest_note(root: Root, name: str, version: int | None) -> str:
    """For a version folder that exists without its manifest (deleted, or a publish that never finished)."""
    if version is None:
        return ""
    try:
        there = root.exists(root.join(name, f"v{version}"))
    except Exception:  # noqa: BLE001 - only a hint
        return ""
    return (f" (folder {name}/v{version} exists but its {MANIFEST} is missing: the version is not published or its "
            "manifest was deleted)") if there else ""


def read_manifest(root: Root, name: str, version: int) -> Manifest:
    path = root.join(name, f"v{version}", MANIFEST)
    try:
        return Manifest.model_validate_json(root.read_bytes(path))
    except FileNotFoundError:
        raise StoreError(f"{name}@v{version} is not published at {root.url} (no manifest.json)") from None
    except ValidationError as e:
        raise IntegrityError(f"{name}@v{version}/manifest.json is not a valid manifest: "
                             f"{e.errors()[0]['msg']}", [MANIFEST]) from None


def read_index(root: Root, name: str, version: int, manifest: Manifest | None = None, verify: bool = True):
    """The version's samples.parquet as a pyarrow Table (its sha256 checked against the manifest)."""
    data = root.read_bytes(root.join(name, f"v{version}", SAMPLES))
    if verify:
        m = manifest or read_manifest(root, name, version)
        got = codec.sha256(data)
        if got != m.samples_parquet_sha256 and m.files.get(SAMPLES) == got:
            raise IntegrityError(f"{name}@v{version}/{MANIFEST}: its samples_parquet_sha256 disagrees with "
                                 f"{SAMPLES} and with its own file list; the manifest is corrupted", [MANIFEST])
        if got != m.samples_parquet_sha256:
            raise IntegrityError(f"{name}@v{version}/{SAMPLES}: sha256 mismatch (expected "
                                 f"{m.samples_parquet_sha256[:12]}..., got {got[:12]}...); the file is corrupted",
                                 [SAMPLES])
    return pq.read_table(io.BytesIO(data))


def show_text(root: Root, ref: str) -> str:
    name, version = resolve_version(root, ref)
    m = read_manifest(root, name, version)
    top = sorted(((k, v) for k, v in m.counts.class_samples.items()), key=lambda kv: -kv[1])
    lines = [
        f"{m.name}@v{m.version}  ({m.domain}, {m.counts.samples} samples, created {m.created_at})",
        f"  splits: {', '.join(f'{k} {v}' for k, v in m.counts.splits.items())}",
        f"  findings measured: {m.counts.findings}; QC-failed samples kept: {m.counts.qc_failed}",
        *[f"    {line}" for line in findings_summary(root, name, version, m)],
        f"  classes (samples containing): {', '.join(f'{k} {v}' for k, v in top)}",
        f"  card: {root.uri(name, f'v{version}', 'README.md')} (pairforge show {name}@v{version} --card)",
        f"  spec hash {m.spec_hash[:16]}; parent version: {m.parent_version or 'none'}",
        f"  code: pairforge {m.code.pairforge_version} ({m.code.code_version}), git {m.code.git_commit or 'unknown'}",
        f"  content digest: {m.content_digest}",
        f"  watermark: {m.watermark.scheme if m.watermark else 'off'}",
        f"  run: {m.run_id or 'none'}; versions of {name}: "
        f"{', '.join(f'v{v}' for v in published_versions(root, name))}",
    ]
    return "\n".join(lines)


def findings_summary(root: Root, name: str, version: int, m: Manifest | None = None) -> list[str]:
    """One line per measured finding kind: count, size range and where, from the version's index."""
    table = read_index(root, name, version, m)
    kinds: dict[str, dict[str, Any]] = {}
    for row in table.column("measured").to_pylist():
        for f in row or []:
            k = kinds.setdefault(str(f.get("kind") or "?"), {"n": 0, "sizes": [], "where": {}})
            k["n"] += 1
            size = next((f.get(key) for key in ("equivalent_diameter_mm", "diameter_mm", "length_mm", "long_axis_mm")
                         if f.get(key) is not None), None)
            if size is not None:
                k["sizes"].append(float(size))
            loc = f.get("lobe") or f.get("location") or f.get("region")
            if isinstance(loc, str) and loc:
                k["where"][loc] = k["where"].get(loc, 0) + 1
    out = []
    for kind, k in sorted(kinds.items(), key=lambda kv: -kv[1]["n"]):
        sizes = f", {min(k['sizes']):.1f}-{max(k['sizes']):.1f} mm" if k["sizes"] else ""
        where = sorted(k["where"].items(), key=lambda kv: -kv[1])
        at = f"; {', '.join(f'{w} {c}' for w, c in where)}" if where else ""
        out.append(f"{kind}: {k['n']}{sizes}{at}")
    return out


# ---------------------------------------------------------------- the loader
class VersionDataset(Sequence):
    """A published version as a sequence of sample dicts.

    ``ds[i]`` -> {"image": HU float32 (CT) or uint8 HxW[x3] (surface), "label": uint8 HxW, "instance": uint16 HxW,
    "sample_id", "index", "split", "spacing_mm", "requested", "measured", "qc_passed", "watermark_payload"}.
    ``ds.torch()`` yields the same with torch tensors; ``ds.monai()`` is a ``monai.data.Dataset`` of channel-first
    dicts. Every file read is checked against its sha256 (``verify=False`` skips that); a mismatch raises
    IntegrityError naming the file.
    """

    def __init__(self, root: Root, name: str, version: int, split: str | None = None, verify: bool = True):
        self.root, self.name, self.version, self.verify = root, name, version, verify
        self.manifest = read_manifest(root, name, version)
        try:
            table = read_index(root, name, version, self.manifest, verify=verify)
        except IntegrityError:
            raise
        except Exception as e:  # noqa: BLE001 - Parquet that cannot be read
            raise IntegrityError(f"{name}@v{version}/{SAMPLES}: cannot be read ({type(e).__name__}); the file is "
                                 "corrupted", [SAMPLES]) from None
        if verify:
            problems = manifest_problems(self.manifest, name, version, table)
            _, digest_problems = _version_files(root, name, version, self.manifest)
            problems += digest_problems
            if problems:
                raise IntegrityError(f"{name}@v{version}/{problems[0]}", [MANIFEST])
        if split is not None:
            known = sorted(set(table.column("split").to_pylist()))
            if split not in known:
                raise StoreError(f"split {split!r} is not in {name}@v{version}; splits there: {', '.join(known)}")
            mask = np.array(table.column("split").to_pylist()) == split
            table = table.filter(mask)
        self.table = table
        self._rows = table.to_pylist()
        self.split = split

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"

    def __len__(self) -> int:
        return len(self._rows)

    def _read(self, rel: str, sha: str) -> bytes:
        try:
            data = self.root.read_bytes(self.root.join(self.name, f"v{self.version}", rel))
        except FileNotFoundError:
            raise IntegrityError(f"{self.ref}/{rel}: file is missing", [rel]) from None
        if self.verify and codec.sha256(data) != sha:
            raise IntegrityError(f"{self.ref}/{rel}: sha256 mismatch (expected {sha[:12]}..., got "
                                 f"{codec.sha256(data)[:12]}...); the file is corrupted", [rel])
        return data

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        r = self._rows[i]
        c = codecs.codec_for_row(r)
        stored, meta = c.read_meta(self._read(r["image_path"], r["image_sha256"]))
        return {
            "image": c.decode(stored),
            "label": c.map_from_bytes(self._read(r["label_path"], r["label_sha256"])),
            "instance": c.map_from_bytes(self._read(r["instance_path"], r["instance_sha256"])),
            **meta,  # e.g. "affine" (4x4, voxel (i, j, k) -> RAS+ mm) for volume codecs
            "sample_id": r["sample_id"], "index": r["index"], "split": r["split"], "domain": r["domain"],
            "spacing_mm": r["pixel_spacing_mm"],
            "requested": [finding_dict(f) for f in r["requested"] or []],
            "measured": [finding_dict(f) for f in r["measured"] or []],
            "qc_passed": r["qc"]["passed"] if r["qc"] else None,
            "watermark_payload": r["watermark_payload"],
        }

    def row(self, i: int) -> dict[str, Any]:
        """Sample ``i``'s index row without pixels (sample_id, split, domain, image_encoding, findings as dicts...),
        read from the sha-checked index; what exporters select and name files by."""
        r = dict(self._rows[i])
        r["requested"] = [finding_dict(f) for f in r.get("requested") or []]
        r["measured"] = [finding_dict(f) for f in r.get("measured") or []]
        return r

    def file_bytes(self, i: int, kind: str) -> bytes:
        """The stored bytes of sample ``i``'s ``kind`` file ("image", "label" or "instance"), checked against its
        sha256 (IntegrityError naming the file otherwise): exporters copy published files through this."""
        if kind not in ("image", "label", "instance"):
            raise ValueError(f"file kind {kind!r}; accepted: image, label, instance")
        r = self._rows[i]
        return self._read(r[f"{kind}_path"], r[f"{kind}_sha256"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def numpy(self) -> Iterator[dict[str, Any]]:
        return iter(self)

    def torch(self) -> Iterator[dict[str, Any]]:
        """Sample dicts with torch tensors: image float32 (C, H, W), label int64 (H, W), instance int64 (H, W)."""
        from schemas.extras import import_extra

        torch = import_extra("torch", "VersionDataset.torch()", "monai")
        for d in self:
            img = d["image"].astype(np.float32)
            img = img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0)
            yield dict(d, image=torch.from_numpy(np.ascontiguousarray(img)),
                       label=torch.from_numpy(d["label"].astype(np.int64)),
                       instance=torch.from_numpy(d["instance"].astype(np.int64)))

    def monai_item(self, i: int) -> dict[str, Any]:
        """MONAI-style dict: channel-first "image" (C, H, W) float32, "label" and "instance" (1, H, W), plus metadata
        that batches with MONAI's default collate (findings as JSON text, since their count varies per sample).
        Volumes (samples whose file carries an affine): MONAI ``MetaTensor`` s (1, X, Y, Z) with the RAS affine, as
        ``LoadImaged`` + ``EnsureChannelFirstd`` would give from the NIfTI files, and ``pixdim`` (x, y, z) mm."""
        d = self[i]
        if d.get("affine") is not None:
            return self._monai_volume(d)
        img = d["image"].astype(np.float32)
        img = img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0)
        return {"image": np.ascontiguousarray(img), "label": d["label"][None], "instance": d["instance"][None],
                "sample_id": d["sample_id"], "index": d["index"], "split": d["split"], "domain": d["domain"],
                "spacing_mm": d["spacing_mm"], "pixdim": (d["spacing_mm"], d["spacing_mm"]),
                "qc_passed": bool(d["qc_passed"]), "watermark_payload": d["watermark_payload"] or "",
                "requested_json": dumps(d["requested"]), "measured_json": dumps(d["measured"])}

    @staticmethod
    def _volume_xyz(d: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(image, label, instance) as (1, X, Y, Z) arrays from [k, j, i] volumes, and the 4x4 RAS affine."""
        def xyz(a, dtype):
            return np.ascontiguousarray(np.asarray(a).transpose(2, 1, 0)[None].astype(dtype))

        return (xyz(d["image"], np.float32), xyz(d["label"], np.int64), xyz(d["instance"], np.int64),
                np.asarray(d["affine"], np.float64))

    def _monai_volume(self, d: dict[str, Any]) -> dict[str, Any]:
        import torch
        from monai.data import MetaTensor

        img, lab, ins, aff = self._volume_xyz(d)
        pixdim = tuple(float(v) for v in np.sqrt((aff[:3, :3] ** 2).sum(0)))
        aff_t = torch.as_tensor(aff)
        meta = {"pixdim": pixdim, "space": "RAS"}
        return {"image": MetaTensor(torch.from_numpy(img), affine=aff_t, meta=dict(meta)),
                "label": MetaTensor(torch.from_numpy(lab), affine=aff_t, meta=dict(meta)),
                "instance": MetaTensor(torch.from_numpy(ins), affine=aff_t, meta=dict(meta)),
                "sample_id": d["sample_id"], "index": d["index"], "split": d["split"], "domain": d["domain"],
                "spacing_mm": d["spacing_mm"], "pixdim": pixdim,
                "qc_passed": bool(d["qc_passed"]), "watermark_payload": d["watermark_payload"] or "",
                "requested_json": dumps(d["requested"]), "measured_json": dumps(d["measured"])}

    def torchio_subject(self, i: int):
        """Sample ``i`` as a ``torchio.Subject``: ``image`` (ScalarImage, HU), ``label`` and ``instance`` (LabelMap),
        each (1, X, Y, Z) with the RAS affine (2D samples: (C, W, H, 1) at their pixel spacing), plus metadata."""
        import torch
        import torchio as tio

        d = self[i]
        if d.get("affine") is not None:
            img, lab, ins, aff = self._volume_xyz(d)
        else:
            sp = float(d["spacing_mm"])
            aff = np.diag([sp, sp, 1.0, 1.0])
            im = d["image"].astype(np.float32)
            im = im[None] if im.ndim == 2 else np.moveaxis(im, -1, 0)
            img = np.ascontiguousarray(im.transpose(0, 2, 1)[..., None])
            lab = np.ascontiguousarray(d["label"].astype(np.int64).T[None, ..., None])
            ins = np.ascontiguousarray(d["instance"].astype(np.int64).T[None, ..., None])
        return tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(img), affine=aff),
                           label=tio.LabelMap(tensor=torch.from_numpy(lab), affine=aff),
                           instance=tio.LabelMap(tensor=torch.from_numpy(ins), affine=aff),
                           sample_id=d["sample_id"], index=d["index"], split=d["split"], domain=d["domain"],
                           requested_json=dumps(d["requested"]), measured_json=dumps(d["measured"]))

    def torchio(self, transform=None):
        """A ``torchio.SubjectsDataset`` over this version (subjects read when the dataset is built)."""
        import torchio as tio

        return tio.SubjectsDataset([self.torchio_subject(i) for i in range(len(self))], transform=transform)

    def monai(self, transform=None):
        """A ``monai.data.Dataset`` over this version (items loaded lazily, transforms applied by MONAI)."""
        from schemas.extras import import_extra

        Dataset = import_extra("monai.data", "VersionDataset.monai()", "monai").Dataset
        return Dataset(data=_MonaiView(self), transform=transform)


class _MonaiView(Sequence):
    def __init__(self, ds: VersionDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self.ds.monai_item(j) for j in range(*i.indices(len(self)))]
        return self.ds.monai_item(i)


# ---------------------------------------------------------------- verify (pull: store/transfer.py)
@dataclass
class VersionReport:
    ref: str
    files_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """A verdict line, then one line per problem (each names its file)."""
        if self.ok:
            return [str(self)]
        return [f"{self.ref}: {len(self.problems)} problem(s) in {self.files_checked} files checked"] + [
            f"  {p}" for p in self.problems]

    def __str__(self) -> str:
        if self.ok:
            return f"{self.ref}: OK, {self.files_checked} files match their sha256 and the content digest"
        more = f" (+{len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        return f"{self.ref}: {len(self.problems)} problem(s): {'; '.join(self.problems[:5])}{more}"


def _version_files(root: Root, name: str, version: int, m: Manifest) -> tuple[dict[str, str], list[str]]:
    problems: list[str] = []
    try:
        table = read_index(root, name, version, m, verify=True)
    except IntegrityError as e:
        if MANIFEST in e.paths:
            return dict(m.files), [f"{MANIFEST}: samples_parquet_sha256 disagrees with {SAMPLES} and with the "
                                   "manifest's own file list"]
        return dict(m.files), [f"{SAMPLES}: sha256 mismatch, the index is corrupted"]
    except Exception as e:  # noqa: BLE001 - unreadable Parquet behind a matching hash (e.g. a changed manifest)
        return dict(m.files), [f"{SAMPLES}: cannot be read ({type(e).__name__})"]
    files = dict(m.files)
    cols = table.select(["image_path", "image_sha256", "label_path", "label_sha256", "instance_path",
                         "instance_sha256"]).to_pydict()
    for p, h in (("image_path", "image_sha256"), ("label_path", "label_sha256"), ("instance_path", "instance_sha256")):
        files.update(zip(cols[p], cols[h]))
    if content_digest(files) != m.content_digest:
        problems.append(f"{MANIFEST}: the content digest disagrees with the file hashes of the index and manifest")
    return files, problems


def manifest_problems(m: Manifest, name: str, version: int, table=None) -> list[str]:
    """What in ``manifest.json`` contradicts its own folder, its spec or the index (``table``, already checked
    against the manifest's sha256): each a line naming manifest.json. A changed byte in a hash, a count, the spec,
    the name or the version shows here or in the content digest; any other changed value (created_at, library
    versions) shows in the manifest's own ``manifest_sha256`` (versions published before it existed do not record
    one, and their free text stays uncovered)."""
    out = []
    if m.manifest_sha256 is not None and m.self_digest() != m.manifest_sha256:
        out.append(f"{MANIFEST}: its content does not match its own manifest_sha256 (a value in it was changed)")
    if m.name != name or m.version != version:
        out.append(f"{MANIFEST}: names {m.name}@v{m.version} but lies in {name}/v{version}")
    d = {k: v for k, v in m.spec.items() if k not in ("schedule", "description")}  # as schemas.spec.spec_hash
    if hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest() != m.spec_hash:
        out.append(f"{MANIFEST}: spec_hash does not match the spec it records")
    if table is not None:
        splits: dict[str, int] = {}
        for sp in table.column("split").to_pylist():
            splits[sp] = splits.get(sp, 0) + 1
        findings = sum(len(f or []) for f in table.column("measured").to_pylist())
        failed = sum(1 for q in table.column("qc").to_pylist() if q and not q.get("passed", True))
        have = (m.counts.samples, dict(sorted(m.counts.splits.items())), m.counts.findings, m.counts.qc_failed)
        if have != (table.num_rows, dict(sorted(splits.items())), findings, failed):
            out.append(f"{MANIFEST}: counts (samples, splits, findings, QC failures) disagree with {SAMPLES}")
    return out


def verify_version_at(root: Root, ref: str) -> VersionReport:
    name, version = resolve_version(root, ref)
    m = read_manifest(root, name, version)
    report = VersionReport(f"{name}@v{version}")
    files, report.problems = _version_files(root, name, version, m)
    try:
        table = read_index(root, name, version, m, verify=True)
    except Exception:  # noqa: BLE001 - already reported by _version_files
        table = None
    report.problems += manifest_problems(m, name, version, table)
    base = root.join(name, f"v{version}")
    paths = [f"{base}/{rel}" for rel in sorted(files)]
    blobs = _cat_many(root, paths)
    for rel, path in zip(sorted(files), paths):
        data = blobs.get(path)
        report.files_checked += 1
        if data is None:
            report.problems.append(f"{rel}: missing")
        elif codec.sha256(data) != files[rel]:
            report.problems.append(f"{rel}: sha256 mismatch (expected {files[rel][:12]}..., got "
                                   f"{codec.sha256(data)[:12]}...)")
    return report


def _cat_many(root: Root, paths: list[str], batch: int = 256) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for s in range(0, len(paths), batch):
        chunk = paths[s:s + batch]
        if root.local:
            for p in chunk:
                try:
                    with open(p, "rb") as f:
                        out[p] = f.read()
                except FileNotFoundError:
                    out[p] = None
        else:
            got = root.fs.cat(chunk, on_error="return")
            for p in chunk:
                v = got.get(p, got.get(root.fs._strip_protocol(p)))
                if isinstance(v, BaseException) and not isinstance(v, FileNotFoundError):
                    try:  # a transient error (5xx, timeout) is not a missing file: ask again, with back-off
                        v = root.read_bytes(p)
                    except FileNotFoundError:
                        v = None
                out[p] = v if isinstance(v, (bytes, bytearray)) else None
    return out
