"""Writing a dataset version: reserving its number, writing shards to staging (watermark, encode, PNGs, a Parquet
part, then a commit marker), and publishing the whole version atomically with manifest.json last.

Every data file (PNGs, shard parts, samples.parquet, README.md) is a pure function of (spec, code, version
number): no clocks, run ids or host names inside them; those go into manifest.json only.

Publish is atomic on a local disk by a single ``rename`` of the staged folder to ``v<N>``; on object stores
(no rename) the files go straight to ``v<N>/`` and ``manifest.json`` is written last with an exclusive create:
readers only ever see versions whose manifest exists.
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import io
import json
import os
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.arrow import (SAMPLE_SCHEMA, bbox_row, dumps, finding_row, qc_check_row, to_jsonable)
from schemas.manifest import CodeInfo, Counts, Manifest, WatermarkInfo
from schemas.plan import plan_shards
from schemas.sample import Sample
from schemas.spec import BaseSpec, normalised_spec
from store import codec
from store import codecs
from store import watermark as wm
from store.errors import PublishError, StoreError
from store.root import MANIFEST, README, SAMPLES, Root, check_name, ensure_writable

PARQUET_ROW_GROUP = 8192
PARQUET_OPTIONS = dict(compression="zstd", compression_level=3, use_dictionary=True, write_statistics=True,
                       row_group_size=PARQUET_ROW_GROUP, data_page_size=1 << 20)
PAYLOAD_LAYOUT = "64 bits: dataset id (24, sha256(name)[:3]) | version (16) | sample index (24); + CRC-16"
PIXEL_LIBRARIES = {"numpy": "numpy", "opencv": "opencv-python", "torch": "torch", "diffusers": "diffusers",
                   "monai": "monai", "scipy": "scipy", "pillow": "pillow", "pyarrow": "pyarrow"}


@dataclass(frozen=True)
class PublishedVersion:
    name: str
    version: int
    uri: str

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"


# ---------------------------------------------------------------- code and library facts
@functools.lru_cache(maxsize=1)
def pairforge_version() -> str:
    try:
        return metadata.version("pairforge")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str | None, bool | None]:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None, None
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


# The module each pixel library is imported as: its ``__version__`` is what this interpreter actually ran.
PIXEL_MODULES = {"numpy": "numpy", "opencv": "cv2", "torch": "torch", "diffusers": "diffusers", "monai": "monai",
                 "scipy": "scipy", "pillow": "PIL", "pyarrow": "pyarrow"}


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that shaped pixels: the imported module's ``__version__`` where this process has
    imported it (what actually ran, e.g. ``cv2.__version__``), else the installed distribution's version, else None.
    Nothing is imported here (torch stays unloaded on the lean install)."""
    import sys

    out: dict[str, str | None] = {}
    for key, dist in PIXEL_LIBRARIES.items():
        mod = sys.modules.get(PIXEL_MODULES[key])
        version = getattr(mod, "__version__", None) if mod is not None else None
        if isinstance(version, str):
            out[key] = version
            continue
        candidates = [dist] + (["opencv-python-headless", "opencv-contrib-python"] if key == "opencv" else [])
        out[key] = None
        for d in candidates:
            try:
                out[key] = metadata.version(d)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def class_names(domain: str) -> dict[int, str]:
    """The class table of a domain as {id: name}, or {} if none is known."""
    from schemas.classes import class_table

    try:
        return dict(class_table(domain).names)
    except KeyError:
        return {}


def label_counts(label: np.ndarray) -> np.ndarray:
    """Pixels of each class id 0-255 of a uint8 label map (int64, 256 entries): ``np.bincount`` with minlength 256,
    three times faster through OpenCV's histogram for maps under 2^24 pixels (its float32 counts are exact there)."""
    if label.ndim == 2 and label.size < (1 << 24) and label.dtype == np.uint8:
        import cv2

        return cv2.calcHist([np.ascontiguousarray(label)], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    return np.bincount(label.ravel(), minlength=256)


def parquet_bytes(table: pa.Table) -> bytes:
    """Deterministic Parquet bytes (fixed options, fixed row groups)."""
    buf = io.BytesIO()
    pq.write_table(table.cast(SAMPLE_SCHEMA), buf, **PARQUET_OPTIONS)
    return buf.getvalue()


def content_digest(files: dict[str, str]) -> str:
    """sha256 over the sorted lines "<path> <sha256>\\n" of a version's files (manifest.json excluded)."""
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(f"{path} {files[path]}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------- one sample -> files and a row
def _provenance(name: str, version: int, sample: Sample, code_version: str, payload_hex: str | None,
                encoding: str) -> dict[str, Any]:
    return {
        "dataset": name, "version": int(version), "sample_id": sample.sample_id, "index": int(sample.index),
        "spec_hash": str(sample.seed.get("spec_hash", "")), "seed": to_jsonable(sample.seed),
        "generator": f"{sample.generator.get('name', '?')}/{sample.generator.get('version', '?')}",
        "code_version": code_version, "pairforge_version": pairforge_version(), "encoding": encoding,
        "watermark": payload_hex, "watermark_scheme": wm.SCHEME if payload_hex else None, "synthetic": True,
    }


def encode_sample(name: str, version: int, sample: Sample, code_version: str,
                  watermark: bool) -> tuple[dict[str, bytes], dict[str, Any]]:
    """One sample -> {relative path: PNG bytes} and its index row (file hashes included)."""
    files, row, _ = _encode_sample(name, version, sample, code_version, watermark)
    return files, row


# A caller's per-sample files, drawn while a shard's arrays are in memory (e.g. the version browser's thumbnails):
# (sample, stored image array as written, its index row, the sample's own files {path relative to the version:
# bytes}) -> {path relative to the version: bytes}.
SampleFiles = Callable[[Sample, np.ndarray, dict, "dict[str, bytes]"], "dict[str, bytes]"]
SAMPLE_DIRS = ("images", "labels", "instances")


def _encode_sample(name: str, version: int, sample: Sample, code_version: str,
                   watermark: bool) -> tuple[dict[str, bytes], dict[str, Any], np.ndarray]:
    image_codec = codecs.codec_for_domain(sample.domain)
    stored = image_codec.encode(np.asarray(sample.image))
    encoding = image_codec.describe(stored)
    payload_hex = None
    if watermark:
        payload = wm.payload_for(name, version, sample.index)
        stored = image_codec.watermark(stored, payload, keep_out=image_codec.keep_out(np.asarray(sample.instance)))
        payload_hex = payload.hex
    prov = _provenance(name, version, sample, code_version, payload_hex, encoding)
    sid = sample.sample_id
    image_path = f"images/{sid}{image_codec.suffix}"  # .png for PNG codecs; a volume codec brings its own
    label_path, instance_path = f"labels/{sid}{image_codec.label_suffix}", f"instances/{sid}{image_codec.label_suffix}"
    context = image_codec.sample_context(sample)  # {} for PNG codecs: their bytes are as before
    files = {
        image_path: image_codec.to_bytes(stored, text={**prov, **context}),
        label_path: image_codec.label_to_bytes(sample.label, context),
        instance_path: image_codec.instance_to_bytes(sample.instance, context),
    }
    h, w, channels = image_codec.plane_shape(stored)
    label_dims = np.asarray(sample.label).ndim
    if stored.shape[:label_dims] != np.asarray(sample.label).shape:
        raise ValueError(f"sample {sid}: image {stored.shape[:label_dims]} and label {np.asarray(sample.label).shape} "
                         "differ in size")
    row = {
        "sample_id": sid, "index": int(sample.index), "split": sample.split, "domain": sample.domain,
        "image_path": image_path, "label_path": label_path, "instance_path": instance_path,
        "image_sha256": codec.sha256(files[image_path]),
        "label_sha256": codec.sha256(files[label_path]),
        "instance_sha256": codec.sha256(files[instance_path]),
        "image_encoding": encoding, "width": int(w), "height": int(h),
        "channels": channels,
        "pixel_spacing_mm": float(sample.spacing_mm),
        "requested": [finding_row(f) for f in sample.requested],
        "measured": [finding_row(f) for f in sample.measured],
        "bboxes": [bbox_row(b) for b in sample.bboxes],
        "qc": {"passed": bool(sample.qc.get("passed", True)), "attempts": int(sample.qc.get("attempts", 1)),
               "checks": [qc_check_row(c) for c in sample.qc.get("checks", [])],
               "history_json": dumps(sample.qc.get("history", []))},
        "seed": {"spec_hash": str(sample.seed.get("spec_hash", "")), "index": int(sample.seed.get("index", sample.index)),
                 "attempt": int(sample.seed.get("attempt", 0)), "seed": int(sample.seed.get("seed", 0))},
        "generator": {"name": str(sample.generator.get("name", "")), "version": str(sample.generator.get("version", "")),
                      "params_json": dumps(sample.params)},
        "watermark_payload": payload_hex,
        "provenance": {k: prov[k] for k in ("dataset", "version", "spec_hash", "code_version", "pairforge_version",
                                            "generator", "watermark_scheme", "synthetic")},
        "image_codec": image_codec.record(),
        "group": getattr(sample, "group", None),
    }
    return files, row, stored


# ---------------------------------------------------------------- the build
class BuildStaging:
    """A build in progress of one (dataset, spec digest, code version); see ``DatasetStore.open_build``."""

    def __init__(self, root: Root, spec: BaseSpec, spec_text: str, digest: str, code_version: str, key: str,
                 version: int):
        self.root, self.spec, self.spec_text, self.digest = root, spec, spec_text, digest
        self.code_version, self.key, self.version = code_version, key, int(version)
        self.name = spec.name
        self.staging_dir = root.join(self.name, "_staging", key)
        self.version_dir = root.version_dir(self.name, self.version)
        # Local disks: stage beside the final folder and rename at publish. Object stores: write in place.
        self.data_dir = root.join(self.name, "_staging", key, "data") if root.local else self.version_dir
        self.shards = plan_shards(spec.samples, spec.shard_size)

    def __repr__(self) -> str:
        return f"BuildStaging({self.name}@v{self.version}, key={self.key}, data={self.data_dir})"

    # ---- shards
    def _marker(self, i: int) -> str:
        return f"{self.staging_dir}/parts/shard-{i:05d}.done.json"

    def _part(self, i: int) -> str:
        return f"{self.staging_dir}/parts/shard-{i:05d}.parquet"

    def finished_shards(self) -> set[int]:
        names = self.root.listdir_names(f"{self.staging_dir}/parts")
        return {int(n[6:11]) for n in names if n.startswith("shard-") and n.endswith(".done.json")}

    def has_shard(self, i: int) -> bool:
        self.root.refresh()
        return self.root.exists(self._marker(i))

    def write_shard(self, i: int, samples: list[Sample], sample_files: SampleFiles | None = None) -> dict[str, Any]:
        """Watermark, encode and write one shard's PNGs, then its Parquet part, then its commit marker (last).

        ``sample_files(sample, stored image, index row, the sample's own files)`` adds files of the caller's per
        sample (paths relative to the version, outside images/labels/instances), made here while the arrays are in
        memory: they are written with the shard, their sha256 recorded in its marker, and published with the
        version."""
        if not 0 <= i < len(self.shards):
            raise StoreError(f"shard {i} does not exist; {self.name} has shards 0 to {len(self.shards) - 1}")
        want = list(self.shards[i])
        got = sorted(int(s.index) for s in samples)
        if got != want:
            raise StoreError(f"shard {i} must hold samples {want[0]} to {want[-1]} ({len(want)}); got {len(got)} "
                             f"samples with indices {got[:3]}{'...' if len(got) > 3 else ''}")
        files: dict[str, bytes] = {}
        rows = []
        splits: dict[str, int] = {}
        class_pixels = np.zeros(256, np.int64)
        class_samples = np.zeros(256, np.int64)
        findings = qc_failed = 0
        extra: dict[str, bytes] = {}
        for s in sorted(samples, key=lambda s: s.index):
            f, row, stored = _encode_sample(self.name, self.version, s, self.code_version, bool(self.spec.watermark))
            files.update({f"{self.data_dir}/{rel}": data for rel, data in f.items()})
            if sample_files is not None:
                for rel, data in sample_files(s, stored, row, f).items():
                    if rel.split("/", 1)[0] in SAMPLE_DIRS or rel in (MANIFEST, SAMPLES, README) or rel in extra:
                        raise StoreError(f"sample {s.sample_id}: extra file {rel!r} would overwrite a file of the "
                                         "version; use a folder of your own")
                    extra[rel] = data
            rows.append(row)
            splits[s.split] = splits.get(s.split, 0) + 1
            counts = label_counts(np.asarray(s.label, np.uint8))
            class_pixels += counts
            class_samples += counts > 0
            findings += len(s.measured)
            qc_failed += not bool(s.qc.get("passed", True))
        self.root.write_many({**files, **{f"{self.data_dir}/{rel}": data for rel, data in extra.items()}})
        part = parquet_bytes(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA))
        self.root.write_bytes(self._part(i), part)
        summary = {"shard": i, "n": len(rows), "bytes": int(sum(len(d) for d in files.values()) + len(part)),
                   "qc_failed": int(qc_failed)}
        marker = dict(summary, indices=[want[0], want[-1]], splits=splits, findings=int(findings),
                      part_sha256=codec.sha256(part),
                      class_pixels={str(k): int(v) for k, v in enumerate(class_pixels) if v},
                      class_samples={str(k): int(v) for k, v in enumerate(class_samples) if v})
        if extra:
            marker["files_sha256"] = {rel: codec.sha256(data) for rel, data in sorted(extra.items())}
        self.root.write_bytes(self._marker(i), json.dumps(marker, sort_keys=True).encode())
        return summary

    # ---- liveness: heartbeats (read by `pairforge gc`) and the publish lease
    def heartbeat(self, interval_s: float | None = None) -> "Heartbeat":
        """Start writing ``_staging/<key>/heartbeats/<token>.json`` every ``interval_s`` seconds (a daemon thread);
        ``stop()`` ends it and removes the file. While one is fresh, `pairforge gc` leaves this staging alone."""
        return Heartbeat(self.root, self.staging_dir, interval_s or HEARTBEAT_S).start()

    def _acquire_publish_lease(self, token: str) -> bool:
        """Take ``_staging/<key>/publish.lease`` (exclusive create). False while another live process holds it
        (its heartbeat fresh, or the lease younger than LEASE_STALE_S); a stale lease is removed and taken over."""
        lease = f"{self.staging_dir}/publish.lease"
        import socket

        body = json.dumps({"token": token, "time": time.time(), "host": socket.gethostname(), "pid": os.getpid()},
                          sort_keys=True).encode()
        try:
            if self.root.create_exclusive(lease, body):
                return True
        except FileNotFoundError:
            return False  # the staging folder is gone: another process published and removed it (the caller looks)
        try:
            held = json.loads(self.root.read_bytes(lease))
        except (FileNotFoundError, ValueError):
            return False  # released or half-visible a moment ago: look again
        now = time.time()
        beat = last_heartbeat(self.root, self.staging_dir, token=held.get("token"))
        gone = held.get("host") == socket.gethostname() and not pid_alive(held.get("pid"))  # died on this host
        if not gone and (now - float(held.get("time", 0)) < LEASE_STALE_S
                         or (beat is not None and now - beat < LEASE_STALE_S)):
            return False
        try:
            self.root.rm(lease)  # its holder stopped beating: take over
            return self.root.create_exclusive(lease, body)
        except FileNotFoundError:
            return False  # taken over or published meanwhile: look again

    def _published_here(self) -> PublishedVersion | None:
        """This build's version if its manifest exists (same spec and code), else None; PublishError if another
        build's manifest holds the number."""
        root = self.root
        root.refresh()
        if not root.exists(f"{self.version_dir}/{MANIFEST}"):
            return None
        m = Manifest.model_validate_json(root.read_bytes(f"{self.version_dir}/{MANIFEST}"))
        if m.spec_hash == self.digest and m.code.code_version == self.code_version:
            return PublishedVersion(self.name, self.version, root.uri(self.name, f"v{self.version}"))
        raise PublishError(f"{self.name}@v{self.version} is already published by another build")

    # ---- publish
    def _markers(self) -> list[dict]:
        return [json.loads(self.root.read_bytes(self._marker(i))) for i in range(len(self.shards))]

    def publish(self, run_id: str | None = None,
                card: Callable[[str, Manifest], None] | None = None) -> PublishedVersion:
        """Check every shard is there, write samples.parquet, README.md (and the card's files), then manifest.json
        last, making the version visible in one step; then remove the staging folder."""
        root = self.root
        # One publisher per build: processes building the same spec share one staging area; the first takes the
        # lease, the others wait for its manifest (or take over if it stops beating) and return the same version.
        hb = Heartbeat(root, self.staging_dir, HEARTBEAT_S)
        deadline = time.monotonic() + PUBLISH_WAIT_S
        while True:
            done = self._published_here()
            if done is not None:
                root.rm(self.staging_dir)
                return done
            if self._acquire_publish_lease(hb.token):
                break
            if time.monotonic() > deadline:
                raise PublishError(f"cannot publish {self.name}@v{self.version}: another process has been publishing "
                                   f"it for over {PUBLISH_WAIT_S:.0f} s; run the build again later")
            time.sleep(PUBLISH_POLL_S)
        hb.start()
        try:
            return self._publish_leased(run_id, card)
        except BaseException:
            with _suppress():
                root.rm(f"{self.staging_dir}/publish.lease")
            raise
        finally:
            hb.stop()

    def _publish_leased(self, run_id: str | None, card: Callable | None) -> PublishedVersion:
        root = self.root
        done = self._published_here()  # published while we took the lease (a holder that finished meanwhile)
        if done is not None:
            root.rm(self.staging_dir)
            return done
        missing = sorted(set(range(len(self.shards))) - self.finished_shards())
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise PublishError(f"cannot publish {self.name}@v{self.version}: {len(missing)} of {len(self.shards)} "
                               f"shards are not written yet (shards {shown}); write them, then publish")
        markers = self._markers()
        table = self._index(markers)
        samples_bytes = parquet_bytes(table)

        counts = self._counts(markers)
        draft = self._manifest(counts, samples_bytes, files={}, digest="", run_id=run_id)
        root.write_bytes(f"{self.data_dir}/{SAMPLES}", samples_bytes)
        root.write_bytes(f"{self.data_dir}/{README}", minimal_card(draft).encode())
        if card is not None:
            where = self.data_dir if root.local else root.fs.unstrip_protocol(self.data_dir)
            if root.storage_options and not root.local and _accepts_storage_options(card):
                card(where, draft, storage_options=root.storage_options)
            else:
                card(where, draft)

        # samples.parquet, README.md, whatever the card added, and the shards' own extra files (hashed when written)
        files = self._extra_files({rel: h for mk in markers for rel, h in (mk.get("files_sha256") or {}).items()})
        all_files = dict(files)
        cols = table.select(["image_path", "image_sha256", "label_path", "label_sha256", "instance_path",
                             "instance_sha256"]).to_pydict()
        for p, h in (("image_path", "image_sha256"), ("label_path", "label_sha256"),
                     ("instance_path", "instance_sha256")):
            all_files.update(zip(cols[p], cols[h]))
        self._check_present(table)
        manifest = self._manifest(counts, samples_bytes, files=files, digest=content_digest(all_files),
                                  run_id=run_id).sealed()
        body = manifest.model_dump_json(indent=2).encode()
        if root.local:
            _commit_local(root, self.data_dir, self.version_dir, body)
        elif not root.create_exclusive(f"{self.version_dir}/{MANIFEST}", body):
            raise PublishError(f"{self.name}@v{self.version} was published by another build at the same time")
        root.rm(self.staging_dir)
        return PublishedVersion(self.name, self.version, root.uri(self.name, f"v{self.version}"))

    def _index(self, markers: list[dict] | None = None, columns: list[str] | None = None) -> pa.Table:
        """Every shard's index part, in sample order (what publish writes as samples.parquet). With ``markers``
        each part is checked against the hash its marker holds."""
        root = self.root
        parts = []
        for i in range(len(self.shards)):
            data = root.read_bytes(self._part(i))
            if markers is not None and codec.sha256(data) != markers[i]["part_sha256"]:
                raise PublishError(f"shard {i}'s index part changed after it was written; rewrite shard {i}")
            parts.append(pq.read_table(io.BytesIO(data)))
        table = pa.concat_tables(parts).cast(SAMPLE_SCHEMA)
        table = table.take(pc.sort_indices(table, [("index", "ascending")]))
        return table if columns is None else table.select(columns)

    def index_table(self, columns: list[str] | None = None) -> pa.Table:
        """The staged index (``columns`` of it) once every shard is written, in sample order: the rows publish
        writes as samples.parquet (not checked against the markers here; publish checks them)."""
        return self._index(columns=columns)

    def _check_present(self, table: pa.Table) -> None:
        """Before the manifest: every sample file the index names is there (one listing). A missing one fails the
        publish with its name, and its shard's marker is removed so that a rerun writes the shard again."""
        root = self.root
        root.refresh()
        base = self.data_dir.rstrip("/")
        there = set()
        for path in root.find_files(base):
            path = root.fs._strip_protocol(path)
            there.add(path.split(base.lstrip("/") + "/", 1)[-1] if not path.startswith(base + "/")
                      else path[len(base) + 1:])
        cols = table.select(["index", "image_path", "label_path", "instance_path"]).to_pydict()
        lost: dict[int, list[str]] = {}
        for k, idx in enumerate(cols["index"]):
            for c in ("image_path", "label_path", "instance_path"):
                if cols[c][k] not in there:
                    lost.setdefault(idx, []).append(cols[c][k])
        if not lost:
            return
        shard_of = {j: i for i, r in enumerate(self.shards) for j in r}
        bad = sorted({shard_of[j] for j in lost})
        for i in bad:
            root.rm(self._marker(i))
        names = [p for j in sorted(lost) for p in lost[j]]
        raise PublishError(f"cannot publish {self.name}@v{self.version}: {len(names)} sample files are missing "
                           f"({', '.join(names[:3])}{' ...' if len(names) > 3 else ''}); shards "
                           f"{', '.join(map(str, bad))} will be written again when the build is rerun")

    def _extra_files(self, known: dict[str, str] | None = None) -> dict[str, str]:
        """sha256 of every file of the version that is not a sample PNG (walked, so card files are included);
        ``known``: hashes recorded when a shard wrote its extra files (used for the ones that are there)."""
        known = known or {}
        base = self.data_dir.rstrip("/")
        self.root.refresh()
        out = {}
        for path in self.root.find_files(base):
            rel = path[len(base) + 1:] if path.startswith(base + "/") else path.split(base.lstrip("/") + "/", 1)[-1]
            if rel.split("/", 1)[0] in SAMPLE_DIRS or rel == MANIFEST:
                continue
            out[rel] = known[rel] if rel in known else codec.sha256(self.root.read_bytes(path))
        return out

    def _counts(self, markers: list[dict]) -> Counts:
        names = class_names(self.spec.domain)
        splits: dict[str, int] = {}
        pixels: dict[int, int] = {}
        samples: dict[int, int] = {}
        for mk in markers:
            for k, v in mk["splits"].items():
                splits[k] = splits.get(k, 0) + v
            for k, v in mk["class_pixels"].items():
                pixels[int(k)] = pixels.get(int(k), 0) + v
            for k, v in mk["class_samples"].items():
                samples[int(k)] = samples.get(int(k), 0) + v
        label = lambda k: names.get(k, str(k))  # noqa: E731
        return Counts(samples=sum(m["n"] for m in markers), splits=dict(sorted(splits.items())),
                      class_samples={label(k): samples[k] for k in sorted(samples)},
                      class_pixels={label(k): pixels[k] for k in sorted(pixels)},
                      findings=sum(m.get("findings", 0) for m in markers),
                      qc_failed=sum(m["qc_failed"] for m in markers))

    def _manifest(self, counts: Counts, samples_bytes: bytes, files: dict[str, str], digest: str,
                  run_id: str | None) -> Manifest:
        commit, dirty = git_state()
        wmi = None
        if self.spec.watermark:
            wmi = WatermarkInfo(scheme=wm.SCHEME, payload_layout=PAYLOAD_LAYOUT,
                                dataset_id=f"{wm.dataset_id(self.name):06x}", ct_max_change_hu=wm.CT_AMPLITUDE_HU,
                                u8_max_change=wm.U8_AMPLITUDE,
                                keep_out=f"labelled findings (instance > 0) dilated by {wm.FINDING_MARGIN_PX} px are "
                                         "left unmarked")
        image_codec = codecs.codec_for_domain(self.spec.domain)
        encodings = {"image": image_codec.manifest_description,
                     "label": image_codec.label_encoding, "instance": image_codec.instance_encoding,
                     "provenance": image_codec.provenance_encoding}
        return Manifest(
            name=self.name, version=self.version, domain=self.spec.domain, spec=normalised_spec(self.spec),
            spec_text=self.spec_text, spec_hash=self.digest, parent_version=self._parent(), counts=counts,
            class_table={str(k): v for k, v in sorted(class_names(self.spec.domain).items())}, encodings=encodings,
            codecs={"image": image_codec.manifest_record()},
            samples_parquet_sha256=codec.sha256(samples_bytes), content_digest=digest, files=files,
            code=CodeInfo(pairforge_version=pairforge_version(), code_version=self.code_version, git_commit=commit,
                          git_dirty=dirty),
            libraries=library_versions(), watermark=wmi,
            created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), run_id=run_id)

    def _parent(self) -> int | None:
        older = [v for v in published_versions(self.root, self.name) if v < self.version]
        return max(older) if older else None


HEARTBEAT_S = 30.0        # a running build writes its heartbeat this often
LEASE_STALE_S = 120.0     # a publish lease whose holder has not beaten for this long is taken over
PUBLISH_WAIT_S = 3600.0   # the longest a second publisher of the same build waits for the first
PUBLISH_POLL_S = 0.5


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, Exception)


def pid_alive(pid: Any) -> bool:
    """Whether process ``pid`` on this host may still run (True for this process and for a pid not known)."""
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: judge by time
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _accepts_storage_options(fn: Callable) -> bool:
    import inspect

    target = getattr(fn, "fn", fn)  # a Prefect task wraps the function
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return "storage_options" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class Heartbeat:
    """``<staging>/heartbeats/<token>.json`` = {token, host, pid, time}, rewritten every ``interval_s`` by a daemon
    thread while a build (or a publish) runs. Write failures are ignored: a missed beat only makes the build look
    older to `pairforge gc`, whose threshold (1 h by default) is far above the interval."""

    def __init__(self, root: Root, staging_dir: str, interval_s: float):
        import socket
        import uuid

        self.root, self.staging_dir, self.interval_s = root, staging_dir, float(interval_s)
        self.token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = f"{staging_dir}/heartbeats/{self.token}.json"
        self._stop = None
        self._thread = None

    def beat(self) -> None:
        import socket

        body = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        with _suppress():
            self.root.write_bytes(self.path, json.dumps(body, sort_keys=True).encode())

    def start(self) -> "Heartbeat":
        import threading

        if self._thread is None:
            self.beat()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="pairforge-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
            with _suppress():
                if self.root.exists(self.path):
                    self.root.rm(self.path)

    def __enter__(self) -> "Heartbeat":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def last_heartbeat(root: Root, staging_dir: str, token: str | None = None) -> float | None:
    """The newest heartbeat time (epoch seconds) in a staging area, of one holder (``token``) or of any."""
    best = None
    for name in root.listdir_names(f"{staging_dir}/heartbeats"):
        if not name.endswith(".json") or (token is not None and name != f"{token}.json"):
            continue
        try:
            t = float(json.loads(root.read_bytes(f"{staging_dir}/heartbeats/{name}"))["time"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            continue
        best = t if best is None else max(best, t)
    return best


def _commit_local(root: Root, data_dir: str, version_dir: str, manifest: bytes) -> None:
    def write_manifest() -> None:
        path = os.path.join(data_dir, MANIFEST)
        root._inject("write", path)
        with open(path, "wb") as f:
            f.write(manifest)
            f.flush()
            root._inject("fsync", path)
            os.fsync(f.fileno())

    root.retrying(f"{data_dir}/{MANIFEST}", write_manifest)

    def rename() -> None:
        root._inject("rename", version_dir)
        os.rename(data_dir, version_dir)  # the one atomic step that makes the version visible

    try:
        root.retrying(version_dir, rename)
    except StoreError:
        raise
    except OSError as e:
        raise PublishError(f"cannot publish to {version_dir}: {e.strerror}; is the version number taken?") from None


def minimal_card(m: Manifest) -> str:
    """A small README card; the flows' rich card may replace it. No clocks inside: a pure function of the build."""
    lines = [f"# {m.name} v{m.version}", "", f"Synthetic **{m.domain}** dataset made by pairforge "
             f"{m.code.pairforge_version}: images paired with pixel-exact segmentation labels.", "",
             f"- samples: {m.counts.samples} ({', '.join(f'{k} {v}' for k, v in m.counts.splits.items())})",
             f"- measured findings: {m.counts.findings}; samples kept after failing QC: {m.counts.qc_failed}",
             f"- spec hash: `{m.spec_hash}`",
             f"- image encoding: {m.encodings['image']}", f"- labels: {m.encodings['label']}", ""]
    if m.watermark:
        lines += [f"Every image carries an invisible watermark ({m.watermark.scheme}); "
                  f"`pairforge verify-image` names the dataset, version and sample.", ""]
    lines += ["Files: `samples.parquet` (one row per sample), `images/`, `labels/`, `instances/`, `manifest.json`.",
              "", "```yaml", m.spec_text.rstrip(), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- versions and reservations
def published_versions(root: Root, name: str) -> list[int]:
    """Versions of ``name`` whose manifest exists (the commit marker), ascending."""
    out = []
    for entry in root.listdir_names(root.dataset_dir(name)):
        if entry.startswith("v") and entry[1:].isdigit() and root.exists(root.join(name, entry, MANIFEST)):
            out.append(int(entry[1:]))
    return sorted(out)


def _taken_numbers(root: Root, name: str) -> set[int]:
    taken = {int(e[1:]) for e in root.listdir_names(root.dataset_dir(name)) if e.startswith("v") and e[1:].isdigit()}
    for e in root.listdir_names(root.join(name, "_versions")):
        if e.startswith("v") and e.endswith(".json") and e[1:-5].isdigit():
            taken.add(int(e[1:-5]))
    return taken


def staging_key(digest: str, code_version: str) -> str:
    return f"{digest[:16]}-{hashlib.sha256(code_version.encode()).hexdigest()[:8]}"


def open_build(root: Root, spec: BaseSpec, spec_text: str, digest: str, code_version: str) -> BuildStaging:
    name = check_name(spec.name)
    ensure_writable(root)
    key = staging_key(digest, code_version)
    build_json = root.join(name, "_staging", key, "build.json")
    root.refresh()
    for _ in range(3):
        if root.exists(build_json):
            info = json.loads(root.read_bytes(build_json))
            v = int(info["version"])
            if not root.exists(root.join(name, f"v{v}", MANIFEST)):
                return BuildStaging(root, spec, spec_text, digest, code_version, key, v)
            root.rm(root.join(name, "_staging", key))  # published already, staging left by a crash after commit
            root.refresh()
        v = _reserve(root, name, key, digest, code_version)
        body = json.dumps({"name": name, "version": v, "digest": digest, "code_version": code_version,
                           "key": key}, sort_keys=True).encode()
        if root.create_exclusive(build_json, body):
            return BuildStaging(root, spec, spec_text, digest, code_version, key, v)
        # Another process opened the same build a moment ago: join it (its number wins). Ours was never written
        # into any file, so it is given back (no gap) -- unless the winner holds that very number.
        try:
            theirs = int(json.loads(root.read_bytes(build_json))["version"])
        except (FileNotFoundError, ValueError, KeyError):
            theirs = None
        if theirs is not None and theirs != v:
            root.rm(root.join(name, "_versions", f"v{v}.json"))
    raise PublishError(f"cannot open a build of {name}: its staging folder keeps changing under us")


def _reserve(root: Root, name: str, key: str, digest: str, code_version: str) -> int:
    """The lowest number no reservation or version folder holds (a number given back by a process that joined
    another one's build is taken again, so concurrent builds leave no gaps). Reservations of builds that wrote
    anything are never removed, so a number that may be inside a watermark is never reused."""
    body = json.dumps({"key": key, "digest": digest, "code_version": code_version}, sort_keys=True).encode()
    folders = {int(e[1:]) for e in root.listdir_names(root.dataset_dir(name)) if e.startswith("v") and e[1:].isdigit()}
    reserved = {int(e[1:-5]) for e in root.listdir_names(root.join(name, "_versions"))
                if e.startswith("v") and e.endswith(".json") and e[1:-5].isdigit()}
    # A process of this very build (same key) reserved a number a moment ago and nothing is published under it:
    # share it, so that same-spec builds started together take one number, not one each.
    for n in sorted(reserved - folders if root.local else reserved):
        if n in folders and root.exists(root.join(name, f"v{n}", MANIFEST)):
            continue
        try:
            if root.read_bytes(root.join(name, "_versions", f"v{n}.json")) == body and \
                    not root.exists(root.join(name, f"v{n}", MANIFEST)):
                return n
        except FileNotFoundError:
            continue
    taken = folders | reserved
    v = 1
    for _ in range(1000):
        while v in taken:
            v += 1
        if v >= 1 << 16:
            raise PublishError(f"{name} has used all 65535 version numbers the watermark can carry")
        if root.create_exclusive(root.join(name, "_versions", f"v{v}.json"), body):
            return v
        v += 1
    raise PublishError(f"cannot reserve a version number for {name} (1000 numbers taken while trying)")
