"""Export a published version with Croissant (MLCommons) JSON-LD metadata, validated and read by ``mlcroissant``::

    <dest>/<name>_v<N>/croissant.json                   (the metadata, with RAI fields saying the data is synthetic)
    <dest>/<name>_v<N>/samples.csv                      (one row per sample: id, split, spacing, QC, findings)
    <dest>/<name>_v<N>/images/, labels/, instances/     (the published PNG files, byte for byte)
    <dest>/<name>_v<N>/README.md, PROVENANCE.json

Record sets: ``samples`` (from samples.csv: ``sample_id`` (from the column ``file_name``, so ids stay text), ``split``, ``pixel_spacing_mm``, ``qc_passed``,
``finding_kinds``, ``findings_json``: the measured findings as JSON), ``images``, ``labels`` and ``instances`` (one
record per PNG: ``sample_id`` from the file name, the image content). Every file's sha256 is in the metadata.
CT images are 16-bit PNGs of HU + 1024 (the ``image_codec`` in the metadata's description and README).
"""
from __future__ import annotations

import csv
import datetime
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from schemas.errors import SpecError
from store.export import Option, finding_kinds, register_exporter, exported, staged_folder
from store.export_meta import SYNTHETIC, write_provenance
from store.read import VersionDataset

CSV_COLUMNS = ("file_name", "split", "pixel_spacing_mm", "qc_passed", "finding_kinds", "findings_json")


def _metadata(version: VersionDataset, out: Path, prov: dict[str, Any]):
    import mlcroissant as mlc

    m = version.manifest
    csv_sha = hashlib.sha256((out / "samples.csv").read_bytes()).hexdigest()
    dist: list[Any] = [mlc.FileObject(id="samples.csv", name="samples.csv", content_url="samples.csv",
                                      encoding_formats=["text/csv"], sha256=csv_sha,
                                      description="one row per sample")]
    record_sets = [mlc.RecordSet(id="samples", name="samples", description="samples of the version", fields=[
        mlc.Field(id=f"samples/{c}", name=c, data_types=[t], description=d,
                  source=mlc.Source(file_object="samples.csv", extract=mlc.Extract(column=c if c != "sample_id"
                                                                                  else "file_name"),
                                    transforms=[mlc.Transform(regex=r"^([^.]+)\.png$")] if c == "sample_id" else []))
        for c, t, d in (("sample_id", mlc.DataType.TEXT, "sample id (the PNG files' name stem, as text)"),
                        ("split", mlc.DataType.TEXT, "train, val or test"),
                        ("pixel_spacing_mm", mlc.DataType.FLOAT, "pixel spacing, mm"),
                        ("qc_passed", mlc.DataType.BOOL, "QC verdict"),
                        ("finding_kinds", mlc.DataType.TEXT, "finding kinds, ';'-separated"),
                        ("findings_json", mlc.DataType.TEXT, "measured findings as JSON"))])]
    for kind, what in (("images", "images (codec: see description)"), ("labels", "label maps (class table ids)"),
                       ("instances", "instance maps (finding ids)")):
        dist.append(mlc.FileSet(id=f"{kind}-files", name=f"{kind}-files", encoding_formats=["image/png"], includes=[f"{kind}/*.png"],
                                description=what))
        record_sets.append(mlc.RecordSet(id=kind, name=kind, description=what, fields=[
            mlc.Field(id=f"{kind}/sample_id", name="sample_id", data_types=[mlc.DataType.TEXT],
                      description="sample id",
                      source=mlc.Source(file_set=f"{kind}-files",
                                        extract=mlc.Extract(file_property=mlc.FileProperty.filename),
                                        transforms=[mlc.Transform(regex=r"^([^.]+)\.png$")])),
            mlc.Field(id=f"{kind}/content", name="content", data_types=[mlc.DataType.IMAGE_OBJECT],
                      description=what,
                      source=mlc.Source(file_set=f"{kind}-files",
                                        extract=mlc.Extract(file_property=mlc.FileProperty.content))),
        ]))
    wm = prov["watermark"]
    return mlc.Metadata(
        name=f"{m.name}-v{m.version}",
        description=(f"pairforge synthetic dataset {m.ref} ({m.domain}); class table {json.dumps(dict(m.class_table))}; "
                     f"image codec {json.dumps(prov['image_codec'])}; manifest sha256 {prov['manifest_sha256']}"),
        license=[prov["license"]], url=f"pairforge://{m.name}/v{m.version}", version=f"{m.version}.0.0",
        date_published=datetime.datetime.fromisoformat(m.created_at.replace("Z", "+00:00")), cite_as=f"pairforge synthetic dataset {m.ref}, manifest sha256 {prov['manifest_sha256']}",
        creators=[mlc.Organization(name="pairforge (synthetic data generator)")],
        distribution=dist, record_sets=record_sets,
        data_collection=SYNTHETIC + f" Built from spec hash {m.spec_hash}.",
        data_collection_type=["Synthetic data"],
        data_collection_raw_data="None: every sample is generated; there is no raw data.",
        data_annotation_protocol=["Labels are exact by construction: drawn from the spec before the image is "
                                  "rendered; measured values are computed from the label maps."],
        machine_annotation_tools=[f"pairforge {prov['pairforge_version']}"],
        personal_sensitive_information=["None: synthetic data, no person was imaged."],
        data_biases=["Findings follow the spec's mixture, not a clinical or production prevalence."],
        data_limitations=["Synthetic images; realism is measured, not guaranteed (see the dataset card)."],
        data_use_cases=["Training and testing segmentation and detection models; pipeline tests."],
        data_release_maintenance_plan=(f"Versions are immutable; watermark {wm['scheme']} (dataset id "
                                       f"{wm['dataset_id']})" if wm else "Versions are immutable; no watermark."),
    )


@register_exporter("croissant", summary="Croissant (MLCommons) JSON-LD metadata with samples.csv and the PNG files",
                   options={"include_failed": Option(bool, "also export samples that failed QC", False)})
def export_croissant(version: VersionDataset, dest: Path, *, split: Sequence[str] | None = None,
                     classes: Sequence[str] | None = None, overwrite: bool = False,
                     include_failed: bool = False) -> dict[str, Any]:
    import mlcroissant as mlc

    indices = exported(version, split, classes, include_failed)
    final = Path(dest) / f"{version.name}_v{version.version}"
    with staged_folder(final, overwrite=overwrite) as out:
        rows = []
        for kind in ("images", "labels", "instances"):
            (out / kind).mkdir()
        for i in indices:
            r = version.row(i)
            for kind, fk in (("images", "image"), ("labels", "label"), ("instances", "instance")):
                (out / kind / f"{r['sample_id']}.png").write_bytes(version.file_bytes(i, fk))
            rows.append({"file_name": f"{r['sample_id']}.png", "split": r["split"],
                         "pixel_spacing_mm": repr(float(r["pixel_spacing_mm"])),
                         "qc_passed": str(bool((r.get("qc") or {}).get("passed", True))).lower(),
                         "finding_kinds": ";".join(finding_kinds(r)),
                         "findings_json": json.dumps(r["measured"], sort_keys=True, default=str)})
        with open(out / "samples.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            w.writeheader()
            w.writerows(rows)
        prov = write_provenance(out, version, "croissant", "Croissant JSON-LD", len(indices), notes=[
            "Read with `mlcroissant.Dataset('croissant.json').records('samples')` (also 'images', 'labels', "
            "'instances')."])
        meta = _metadata(version, out, prov)
        issues = meta.ctx.issues
        if issues.errors:
            raise SpecError(f"{version.ref}: Croissant metadata is invalid: {'; '.join(sorted(issues.errors))}")
        (out / "croissant.json").write_text(json.dumps(meta.to_json(), indent=1, default=str) + "\n")
    return {"path": str(final), "counts": {"samples": len(indices)}, "file": str(final / "croissant.json"),
            "warnings": sorted(issues.warnings)}
