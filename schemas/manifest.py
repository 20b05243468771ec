"""The manifest of a published dataset version (``manifest.json``): what was built, from which spec and code,
what it contains, and the hashes that pin every byte. Written last; its presence is a version's commit marker.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_FORMAT = "pairforge.dataset/1"


class Counts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: int
    splits: dict[str, int] = Field(description="samples per split")
    class_samples: dict[str, int] = Field(description="samples whose label map contains the class")
    class_pixels: dict[str, int] = Field(description="labelled pixels per class over the whole version")
    findings: int = Field(0, description="measured findings over the whole version")
    qc_failed: int = Field(0, description="samples kept after exhausting their QC attempts")


class CodeInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pairforge_version: str
    code_version: str = Field(description="the build's code version key (part of the staging key)")
    git_commit: str | None = None
    git_dirty: bool | None = None


class WatermarkInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scheme: str
    payload_layout: str
    dataset_id: str = Field(description="24-bit dataset id carried by the mark, hex")
    ct_max_change_hu: int | None = None
    u8_max_change: int | None = None
    keep_out: str


class Manifest(BaseModel):
    """One published version. ``content_digest`` is sha256 over the sorted lines ``"<path> <sha256>\\n"`` of every
    file of the version except manifest.json itself."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["pairforge.dataset/1"] = MANIFEST_FORMAT
    name: str
    version: int = Field(ge=1)
    domain: str
    spec: dict[str, Any] = Field(description="the spec, normalised (all defaults filled in)")
    spec_text: str = Field(description="the spec as written")
    spec_hash: str
    parent_version: int | None = Field(None, description="the newest version of this dataset published before this one")
    counts: Counts
    class_table: dict[str, str] = Field(default_factory=dict, description="label id -> class name")
    encodings: dict[str, str]
    codecs: dict[str, dict[str, Any]] | None = Field(
        None, description="codec records by role ('image': name, version, params); absent before codecs existed")
    samples_parquet_sha256: str
    content_digest: str
    files: dict[str, str] = Field(description="sha256 of every file that is not a sample's PNG (those are in the index)")
    code: CodeInfo
    libraries: dict[str, str | None] = Field(description="versions of the libraries that shaped the pixels")
    watermark: WatermarkInfo | None = None
    created_at: str = Field(description="UTC, ISO 8601")
    run_id: str | None = Field(None, description="the orchestration (Prefect flow) run id")
    manifest_sha256: str | None = Field(
        None, description="sha256 of this manifest's JSON (indent 2) with this field null: covers every field, free "
                          "text included; absent in versions published before it existed")

    def self_digest(self) -> str:
        """The sha256 ``manifest_sha256`` records: of this manifest, serialised as published, with that field null."""
        import hashlib

        return hashlib.sha256(self.model_copy(update={"manifest_sha256": None}).model_dump_json(indent=2).encode()
                              ).hexdigest()

    def sealed(self) -> "Manifest":
        """This manifest with ``manifest_sha256`` filled in."""
        return self.model_copy(update={"manifest_sha256": self.self_digest()})

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"
