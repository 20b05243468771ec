"""Export a published version as a Hugging Face ``datasets`` folder (``DatasetDict.save_to_disk``), opened with
``datasets.load_from_disk(path)`` and ready to ``push_to_hub``::

    <dest>/<name>_v<N>/dataset_dict.json, <split>/...     (one split per version split)
    <dest>/<name>_v<N>/README.md (dataset card), PROVENANCE.json

Columns: ``image``, ``label``, ``instance`` (``Image`` features holding the published PNG files byte for byte: 8-bit
grey/RGB images as they are, CT as 16-bit PNG of HU + 1024 (``image_codec`` says so); the label map with the class
table's ids; the instance map), ``sample_id``, ``pixel_spacing_mm``, ``qc_passed``, ``image_codec``,
``finding_kinds`` (a sequence of ``ClassLabel`` over the version's finding kinds) and ``findings``: one struct per
measured finding with ``instance``, ``kind`` (``ClassLabel``) and every numeric measurement of the version as a
float column (None where a finding has none). The label map's class names are in the card and in
``info.description``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from store.export import Option, finding_kinds, register_exporter, exported, staged_folder
from store.export_meta import license_of, write_provenance
from store.read import VersionDataset


def _numeric_keys(version: VersionDataset, indices: list[int]) -> list[str]:
    keys = set()
    for i in indices:
        for f in version.row(i)["measured"]:
            keys |= {k for k, v in f.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                     and k != "instance"}
    return sorted(keys)


@register_exporter("hf", summary="Hugging Face datasets folder (save_to_disk): Image features for image/label/"
                   "instance, ClassLabel finding kinds, measurements as columns",
                   options={"include_failed": Option(bool, "also export samples that failed QC", False)})
def export_hf(version: VersionDataset, dest: Path, *, split: Sequence[str] | None = None,
              classes: Sequence[str] | None = None, overwrite: bool = False,
              include_failed: bool = False) -> dict[str, Any]:
    import datasets as hfd

    indices = exported(version, split, classes, include_failed)
    kinds = sorted({k for i in range(len(version)) for k in finding_kinds(version.row(i))})
    keys = _numeric_keys(version, indices)
    kind_label = hfd.ClassLabel(names=kinds or ["none"])
    finding = {"instance": hfd.Value("int32"), "kind": kind_label, **{k: hfd.Value("float64") for k in keys}}
    features = hfd.Features({
        "image": hfd.Image(), "label": hfd.Image(), "instance": hfd.Image(), "sample_id": hfd.Value("string"),
        "pixel_spacing_mm": hfd.Value("float64"), "qc_passed": hfd.Value("bool"), "image_codec": hfd.Value("string"),
        "finding_kinds": hfd.List(kind_label), "findings": hfd.List(finding),
    })
    m = version.manifest
    by_split: dict[str, list[int]] = {}
    for i in indices:
        by_split.setdefault(version.row(i)["split"], []).append(i)

    def rows(idx: list[int]):
        for i in idx:
            r = version.row(i)
            fs = [{"instance": int(f["instance"]), "kind": f["kind"],
                   **{k: (float(f[k]) if isinstance(f.get(k), (int, float)) else None) for k in keys}}
                  for f in r["measured"] if f.get("instance") is not None]
            yield {"image": {"bytes": version.file_bytes(i, "image"), "path": None},
                   "label": {"bytes": version.file_bytes(i, "label"), "path": None},
                   "instance": {"bytes": version.file_bytes(i, "instance"), "path": None},
                   "sample_id": r["sample_id"], "pixel_spacing_mm": float(r["pixel_spacing_mm"]),
                   "qc_passed": bool((r.get("qc") or {}).get("passed", True)),
                   "image_codec": json.dumps(r.get("image_codec"), sort_keys=True),
                   "finding_kinds": finding_kinds(r), "findings": fs}

    final = Path(dest) / f"{m.name}_v{m.version}"
    description = (f"pairforge synthetic dataset {m.ref} (synthetic data; licence {license_of(version)}). "
                   f"Label ids: {json.dumps(dict(m.class_table))}")
    bars = hfd.is_progress_bar_enabled()
    hfd.disable_progress_bars()
    with staged_folder(final, overwrite=overwrite) as out:
        dd = hfd.DatasetDict({
            s: hfd.Dataset.from_list(list(rows(idx)), features=features,
                                     info=hfd.DatasetInfo(description=description, license=license_of(version),
                                                         features=features))
            for s, idx in sorted(by_split.items())})
        try:
            dd.save_to_disk(str(out / "data"))
        finally:
            if bars:
                hfd.enable_progress_bars()
        for p in (out / "data").iterdir():
            p.rename(out / p.name)
        (out / "data").rmdir()
        write_provenance(out, version, "hf", "a Hugging Face datasets folder", len(indices), notes=[
            "Open with `datasets.load_from_disk(path)`. Columns: image, label, instance (Image), sample_id, "
            "pixel_spacing_mm, qc_passed, image_codec, finding_kinds (ClassLabel), findings (measurements).",
            f"Label map class ids: `{json.dumps(dict(m.class_table))}`",
        ])
    return {"path": str(final), "counts": {s: len(v) for s, v in sorted(by_split.items())}, "finding_kinds": kinds}
