"""Published versions under damage and under audit.

- Every measurement a version publishes (measured findings, boxes, QC check values) is recomputed from the
  published files alone (image, label, instance, samples.parquet, manifest.json) for a chest_ct, a surface and a
  chest_ct_volume version, and agrees within the stated tolerances (bench/recompute_measurements.py).
- A truncated, byte-flipped or deleted PNG, NIfTI, Parquet index or manifest is named by `pairforge verify` (one
  line per damaged file, non-zero exit) and refused by the loader in one line naming it; nothing is rewritten.

The versions are published through the store's own staging and publish (no orchestration: the Prefect build of the
same store calls is tested in test_flows.py / test_cli.py).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from bench.recompute_measurements import recompute_version
from schemas.errors import SpecError

SPECS = {
    "ct": """name: ct
domain: chest_ct
samples: 3
seed: 3
shard_size: 3
image: {size: 256, spacing_mm: [1.2, 1.4]}
findings:
  negatives: 0
  mixture:
    - "2 solid nodules 6-9 mm, left lower lobe"
    - "12 mm part-solid nodule in the RLL"
    - "10 mm GGN in the RUL"
""",
    "surf": """name: surf
domain: surface
samples: 4
seed: 4
shard_size: 4
material: brushed_metal
field_of_view_mm: 40
image: {size: 384, color: grey}
defects:
  negatives: 0
  mixture:
    - "scratch 10-20 mm long 0.2-0.3 mm wide"
    - "crack 10-15 mm, bottom edge"
    - {kind: dent, diameter_mm: [3, 5], depth_mm: [0.1, 0.3], location: center}
    - "chipped edge 3-5 mm 1-2 mm wide, top edge"
""",
    "vol": """name: vol
domain: chest_ct_volume
samples: 1
seed: 3
shard_size: 1
volume: {size: [24, 128, 128], spacing_mm: [5.0, 2.8, 2.8]}
findings:
  negatives: 0
  mixture: ["part-solid nodule 12 mm RLL"]
""",
}


def publish(root: Path, text: str) -> Path:
    from flows.inputs import code_version
    from flows.pipeline import make_samples
    from schemas.spec import load_spec_text, spec_hash
    from store import DatasetStore

    spec = load_spec_text(text)
    digest = spec_hash(spec)
    staging = DatasetStore(str(root)).open_build(spec, text, digest, code_version())
    for i, rng in enumerate(staging.shards):
        staging.write_shard(i, make_samples(spec, rng, digest=digest))
    pv = staging.publish()
    return root / pv.name / f"v{pv.version}"


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    return {key: publish(root, text) for key, text in SPECS.items()} | {"root": root}


# ------------------------------------------------------------------------------------------------ recompute
@pytest.mark.parametrize("key,columns", [
    ("ct", {"area_mm2", "equivalent_diameter_mm", "long_axis_mm", "short_axis_mm", "mean_axis_mm",
            "solid_mean_axis_mm", "centroid_px", "centroid_mm", "lobe", "in_region_fraction",
            "lung_rads_size_category", "bbox_px", "bboxes", "cnr", "kind", "qc.finding_count",
            "qc.median_hu_lung"}),
    ("surf", {"area_mm2", "centroid_mm", "length_mm", "width_mm", "diameter_mm", "orientation_deg",
              "in_region_fraction", "contrast", "bboxes", "region"}),
    ("vol", {"voxels", "volume_mm3", "volume_mm3_exact", "equivalent_diameter_mm", "long_axis_mm", "short_axis_mm",
             "mean_diameter_mm", "solid_mean_diameter_mm", "solid_volume_mm3", "centroid_ijk", "centroid_lps_mm",
             "lobe", "in_lobe_fraction", "shell_in_lobe_fraction", "touches_pleura", "touches_fissure", "lung_rads",
             "bbox_ijk", "bboxes", "qc.finding_count", "qc.in_lobe_1"}),
])
def test_every_published_measurement_is_recomputed_from_the_published_files(versions, key, columns):
    rep = recompute_version(versions[key])
    assert rep.mismatches == [], rep.mismatches[:10]
    assert columns <= rep.columns, columns - rep.columns
    assert rep.compared >= 25


def test_every_measured_field_is_among_the_recomputed_columns(versions):
    """No measured field escapes the audit: each key a finding publishes (struct fields and extra) is recomputed."""
    import pyarrow.parquet as pq

    from bench.recompute_measurements import _flat

    not_measurements = {"instance"}
    for key in ("ct", "surf", "vol"):
        rep = recompute_version(versions[key])
        rows = pq.read_table(versions[key] / "samples.parquet").to_pylist()
        published = {k for r in rows for f in r["measured"] for k in _flat(f)} - not_measurements
        missing = {k for k in published if k not in rep.columns and f"{k} (label class)" not in rep.columns}
        assert not missing, (key, missing)


def test_the_recomputation_catches_a_changed_measurement(versions, tmp_path):
    """The audit can fail: a published size changed by 0.1 mm in the index (hashes rewritten to match) is found."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from schemas.arrow import SAMPLE_SCHEMA
    from store.build import parquet_bytes

    folder = tmp_path / "ct" / "v1"
    shutil.copytree(versions["ct"], folder)
    rows = pq.read_table(folder / "samples.parquet").to_pylist()
    rows[0]["measured"][0]["equivalent_diameter_mm"] += 0.1
    (folder / "samples.parquet").write_bytes(parquet_bytes(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)))
    rep = recompute_version(folder)
    assert any("equivalent_diameter_mm" in m for m in rep.mismatches), rep.mismatches


# ------------------------------------------------------------------------------------------------ damage
def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _damage(path: Path, how: str, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":
        i = len(data) // 2 if at is None else at
        data[i] ^= 0x01 if at is not None else 0xFF
        path.write_bytes(bytes(data))
    elif how == "delete":
        path.unlink()


def _manifest_offset(folder: Path, field: str) -> int:
    """Byte offset of the first character of ``field``'s value in manifest.json (a digit or hex character)."""
    text = (folder / "manifest.json").read_text()
    i = text.index(f'"{field}": ') + len(f'"{field}": ')
    return i + 1 if text[i] == '"' else i


CASES = [  # (version, file (a sample's kind or a version file), damage, manifest field to flip)
    ("ct", "image", "truncate", None), ("ct", "image", "flip", None), ("ct", "image", "delete", None),
    ("ct", "label", "flip", None), ("ct", "instance", "delete", None),
    ("ct", "samples.parquet", "truncate", None), ("ct", "samples.parquet", "flip", None),
    ("ct", "samples.parquet", "delete", None),
    ("ct", "manifest.json", "truncate", None), ("ct", "manifest.json", "flip", "content_digest"),
    ("ct", "manifest.json", "flip", "samples_parquet_sha256"), ("ct", "manifest.json", "flip", "spec_hash"),
    ("ct", "manifest.json", "flip", "findings"), ("ct", "manifest.json", "flip", "created_at"),
    ("ct", "manifest.json", "delete", None),
    ("vol", "image", "truncate", None), ("vol", "image", "flip", None), ("vol", "label", "delete", None),
    ("vol", "instance", "flip", None),
]


@pytest.mark.parametrize("key,target,how,field", CASES,
                         ids=[f"{k}-{t}-{h}" + (f"-{f}" if f else "") for k, t, h, f in CASES])
def test_damaged_file_is_named_by_verify_and_refused_by_load(versions, tmp_path, key, target, how, field):
    import pyarrow.parquet as pq

    from store import DatasetStore

    src = versions[key]
    root = tmp_path / "root"
    folder = root / src.parent.name / src.name
    shutil.copytree(src, folder)
    ref = f"{src.parent.name}@{src.name}"
    if target in ("image", "label", "instance"):
        row = pq.read_table(folder / "samples.parquet").to_pylist()[0]
        rel = row[f"{target}_path"]
    else:
        rel = target
    at = _manifest_offset(folder, field) if field else None
    _damage(folder / rel, how, at)
    before = _snapshot(root)

    from bench.fuzz_cli import run_cli

    code, out, err = run_cli(["verify", ref, "--root", str(root)])
    assert code != 0, out
    named = out + err
    assert rel in named, named
    if code == 1:  # a report: the verdict line, then one line per problem, each naming its file
        lines = out.strip().splitlines()
        assert "problem(s)" in lines[0] and any(rel in ln for ln in lines[1:]) and len(lines) >= 2, out
    else:  # the version cannot be opened at all (no or unreadable manifest): one line naming it
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err

    with pytest.raises(SpecError) as e:
        ds = DatasetStore(str(root)).load(ref)
        for i in range(len(ds)):
            ds[i]
    msg = str(e.value)
    assert "\n" not in msg and rel in msg, msg
    assert _snapshot(root) == before  # verify and load wrote nothing, repaired nothing

    # the CLI's other readers refuse too, in one line
    code, out, err = run_cli(["pull", ref, str(tmp_path / "pulled"), "--root", str(root)])
    assert code == 2 and len(err.strip().splitlines()) == 1 and rel in err, err
    assert not (tmp_path / "pulled" / src.parent.name / src.name).exists()


def test_an_intact_copy_verifies_and_loads(versions, tmp_path):
    from bench.fuzz_cli import run_cli
    from store import DatasetStore

    root = tmp_path / "root"
    shutil.copytree(versions["vol"].parent, root / "vol")
    code, out, err = run_cli(["verify", "vol@v1", "--root", str(root)])
    assert code == 0 and "OK" in out, out + err
    ds = DatasetStore(str(root)).load("vol@v1")
    assert ds[0]["image"].shape == (24, 128, 128)
    assert json.loads((root / "vol" / "v1" / "manifest.json").read_text())["name"] == "vol"
