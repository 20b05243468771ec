"""pairforge store: the versioned dataset layout under a root (local folder or fsspec URL), shard writing with
resume, atomic publish, watermarking and provenance, loaders, pull and verify.

    st = DatasetStore(root)                       # None -> the configured root (store/config.py)
    b = st.open_build(spec, spec_text, digest, code_version)
    b.write_shard(i, samples); b.publish(run_id)
    st.load("name@v3").monai()
    pull("name@v3", dest); verify_version("name@v3"); verify_image("copy.jpg", root)
"""
from __future__ import annotations

import os
from typing import Callable

from schemas.manifest import Manifest
from schemas.spec import BaseSpec
from store.build import BuildStaging, PublishedVersion, open_build, published_versions
from store.errors import IntegrityError, NoSpaceError, PublishError, StoreError
from store.read import (VersionDataset, VersionReport, list_dataset_names, read_index, read_manifest,
                        resolve_version, show_text, verify_version_at)
from store.root import Root, check_name, parse_ref, resolve_root
from store.transfer import PullResult, pull_between
from store.verify import ImageVerification, verify_image_file


class DatasetStore:
    """All datasets under one root. ``storage_options`` go to fsspec (e.g. an S3 endpoint and keys)."""

    def __init__(self, root: str | os.PathLike | None = None, storage_options: dict | None = None):
        self.root: Root = resolve_root(root, storage_options)
        self.storage_options = storage_options

    def __repr__(self) -> str:
        return f"DatasetStore({self.root.url!r})"

    @property
    def url(self) -> str:
        return self.root.url

    # ---- writing
    def open_build(self, spec: BaseSpec, spec_text: str, digest: str, code_version: str) -> BuildStaging:
        """Open (or resume) the build of ``spec``: staging is keyed by (name, digest, code_version) and the version
        number is reserved now (exclusive create), so watermarks can carry it; a resumed build keeps it."""
        return open_build(self.root, spec, spec_text, digest, code_version)

    # ---- reading
    def list_datasets(self) -> list[str]:
        return list_dataset_names(self.root)

    def versions(self, name: str) -> list[int]:
        return published_versions(self.root, check_name(name))

    def resolve(self, ref: str) -> tuple[str, int]:
        return resolve_version(self.root, ref)

    def manifest(self, name: str, version: int | None = None) -> Manifest:
        ref = name if version is None else f"{name}@v{int(version)}"
        n, v = resolve_version(self.root, ref)
        return read_manifest(self.root, n, v)

    def index(self, ref: str):
        """The version's samples.parquet as a pyarrow Table (sha256 checked)."""
        n, v = resolve_version(self.root, ref)
        return read_index(self.root, n, v)

    def parquet_uri(self, ref: str) -> str:
        n, v = resolve_version(self.root, ref)
        return self.root.uri(n, f"v{v}", "samples.parquet")

    def load(self, ref: str, split: str | None = None, verify: bool = True) -> VersionDataset:
        n, v = resolve_version(self.root, ref)
        return VersionDataset(self.root, n, v, split=split, verify=verify)

    def show(self, ref: str) -> str:
        return show_text(self.root, ref)

    def verify_version(self, ref: str) -> VersionReport:
        return verify_version_at(self.root, ref)

    def pull(self, ref: str, dest: str | os.PathLike, dest_storage_options: dict | None = None, **kw) -> str:
        """Copy a version to the root ``dest`` (local folder or URL); returns ``<dest>/<name>/v<N>``."""
        return self.pull_to(ref, dest, dest_storage_options, **kw).uri

    def pull_to(self, ref: str, dest: str | os.PathLike, dest_storage_options: dict | None = None, *,
                workers: int = 8, limit_rate: float | str | None = None, progress=None) -> PullResult:
        """``pull`` with its numbers (files, bytes, reused from an interrupted pull, seconds). The destination's
        storage options: ``dest_storage_options``, else the store config's for its URL, else (same protocol as
        this root) this root's."""
        return pull_between(self.root, ref, destination_root(self, dest, dest_storage_options), workers=workers,
                            limit_rate=limit_rate, progress=progress)

    def verify_image(self, path: str | os.PathLike) -> ImageVerification:
        return verify_image_file(path, self.root)

    def gc(self, older_than_s: float = 3600.0, remove: bool = False):
        """Staging areas (and unpublished object-store prefixes) of dead builds; removed only with ``remove``."""
        from store.gc import collect

        return collect(self.root, older_than_s, remove)


def destination_root(src: DatasetStore, dest: str | os.PathLike, storage_options: dict | None = None) -> Root:
    from store.config import storage_options_for

    url = os.fspath(dest)
    if storage_options is None and "://" in url:
        storage_options = storage_options_for(url)
        same = url.split("://", 1)[0] == src.root.url.split("://", 1)[0] if "://" in src.root.url else False
        if storage_options is None and same:
            storage_options = src.storage_options
    r = resolve_root(url, storage_options)
    r.source = "DEST"
    return r


def list_datasets(root: str | None = None, storage_options: dict | None = None) -> dict[str, list[int]]:
    """{dataset name: published versions} under a root."""
    st = DatasetStore(root, storage_options)
    return {n: st.versions(n) for n in st.list_datasets()}


def show(ref: str, root: str | None = None, storage_options: dict | None = None) -> str:
    return DatasetStore(root, storage_options).show(ref)


def pull(ref: str, dest: str | os.PathLike, root: str | None = None, storage_options: dict | None = None,
         dest_storage_options: dict | None = None, **kw) -> str:
    """Copy ``name@vN`` from ``root`` to ``<dest>/<name>/v<N>/`` (each a local folder or an fsspec URL) verifying
    every sha256, resumably and atomically (store/transfer.py); returns that folder or URL."""
    return DatasetStore(root, storage_options).pull(ref, dest, dest_storage_options, **kw)


def verify_version(ref: str, root: str | None = None, storage_options: dict | None = None) -> VersionReport:
    return DatasetStore(root, storage_options).verify_version(ref)


def verify_image(path: str | os.PathLike, root: str | None = None,
                 storage_options: dict | None = None) -> ImageVerification:
    """Recover dataset, version and sample from the watermark; with a reachable root, also whether the pixels still
    match the stored hash. ``root=None`` tries the configured root (store/config.py) if it exists, else decodes only."""
    r = None
    try:
        r = resolve_root(root, storage_options)
        if r.local and not os.path.isdir(r.path):
            r = None
    except StoreError:
        r = None
    return verify_image_file(path, r)


CardFn = Callable[[str, Manifest], None]

__all__ = ["DatasetStore", "BuildStaging", "PublishedVersion", "VersionDataset", "VersionReport",
           "ImageVerification", "StoreError", "IntegrityError", "PublishError", "NoSpaceError", "PullResult",
           "list_datasets", "show", "pull",
           "verify_version", "verify_image", "parse_ref", "CardFn"]
