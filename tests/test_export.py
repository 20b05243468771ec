"""``pairforge export FORMAT NAME@vN DEST``: a surface version built by ``pairforge build`` exported to MVTec AD, read
back and compared with the version pixel for pixel; every refusal (corrupted file, unknown format or option, existing
destination) writes nothing; a format registered from outside the project reaches the command line."""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flows.cli import app
from store import DatasetStore, export
from store.codec import decode_png

SURFACE_SPEC = """\
name: plates
domain: surface
samples: 16
seed: 5
material: cast_metal
field_of_view_mm: 30
image: {size: 160, color: rgb}
splits: {train: 0.5, val: 0.1, test: 0.4}
shard_size: 8
defects:
  negatives: 0.35
  mixture:
    - "scratch 3-8 mm"
    - "2 pits 0.7-1.2 mm"
    - "stain 2-4 mm"
"""


def run_cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_bad_input(res, *, contains: str) -> None:
    err = res.stderr.strip()
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and contains in err, err


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(prefect_api, tmp_path_factory):
    """A surface version built and published by the command line (real Prefect API, real files)."""
    d = tmp_path_factory.mktemp("export-build")
    spec = d / "plates.yaml"
    spec.write_text(SURFACE_SPEC)
    root = d / "datasets"
    res = run_cli("build", spec, "--root", root, "--runner", "threads", "--workers", "1")
    assert res.exit_code == 0, (res.output, res.stderr)
    assert (root / "plates" / "v1" / "manifest.json").is_file()
    return root


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_mvtec_export_copies_the_versions_files_and_masks_its_findings(built, tmp_path):
    dest = tmp_path / "mvtec"
    res = run_cli("export", "mvtec", "plates@v1", dest, "--root", built)
    assert res.exit_code == 0, (res.output, res.stderr)
    assert "exported plates@v1 as mvtec to" in res.output
    class_dir = dest / "plates"  # class_name defaults to the dataset name

    ds = DatasetStore(built).load("plates@v1")
    names = ds.manifest.class_table  # label id -> class name
    by_id = {ds.row(i)["sample_id"]: i for i in range(len(ds))}
    exported = sorted(class_dir.glob("t*/*/*.png"))
    passed = [i for i in range(len(ds)) if ds.row(i)["qc"]["passed"]]
    assert len(exported) == len(passed) > 0
    folders = set()
    for p in exported:
        i = by_id[p.stem]
        row, sample = ds.row(i), ds[i]
        kinds = sorted({f["kind"] for f in row["requested"]})
        part, folder = p.parent.parent.name, p.parent.name
        folders.add(f"{part}/{folder}")
        # the published file, byte for byte (watermark and provenance chunk kept), and so the version's pixels
        assert p.read_bytes() == ds.file_bytes(i, "image")
        assert np.array_equal(decode_png(p.read_bytes()), sample["image"])
        mask_p = class_dir / "ground_truth" / folder / f"{p.stem}_mask.png"
        if not kinds:
            assert folder == "good" and not mask_p.exists()
            assert part == ("train" if row["split"] in ("train", "val") else "test")
            continue
        assert part == "test" and folder == (kinds[0] if len(kinds) == 1 else "combined")
        mask = decode_png(mask_p.read_bytes())
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask == 255, sample["instance"] > 0)
        # every masked pixel is labelled with one of the sample's finding classes in the version's label map
        labelled = {names[str(int(v))] for v in np.unique(sample["label"][mask == 255])}
        assert labelled and labelled <= set(kinds), (labelled, kinds)
    assert {"train/good", "test/good"} <= folders and len(folders) >= 4
    summary = json.loads((class_dir / "pairforge_export.json").read_text())
    assert sum(summary["counts"].values()) == len(exported) and summary["source"] == "plates@v1"
    # usual modes, not a temporary folder's 0700
    mask = _umask()
    for p in [class_dir, *class_dir.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o777 if p.is_dir() else 0o666) & ~mask, (p, oct(mode))
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_split_classes_and_options_narrow_the_export(built, tmp_path):
    ds = DatasetStore(built).load("plates@v1")
    res = run_cli("export", "mvtec", "plates@v1", tmp_path, "--root", built, "--split", "test,val",
                  "--classes", "scratch", "--option", "class_name=cast_plate", "--option", "include_failed=true")
    assert res.exit_code == 0, (res.output, res.stderr)
    got = {p.stem for p in (tmp_path / "cast_plate").glob("t*/*/*.png")}
    want = {ds.row(i)["sample_id"] for i in range(len(ds)) if ds.row(i)["split"] in ("test", "val")
            and all(f["kind"] == "scratch" for f in ds.row(i)["requested"])}
    assert got == want and len(got) >= 2
    assert {p.name for p in (tmp_path / "cast_plate" / "test").iterdir()} <= {"good", "scratch"}


def test_a_corrupted_file_fails_the_export_naming_it_and_writes_nothing(built, tmp_path):
    root = tmp_path / "datasets"
    shutil.copytree(built, root)
    ds = DatasetStore(root).load("plates@v1")
    victim = ds.row(len(ds) - 1)  # the last sample: earlier files are already staged when it is read
    path = root / "plates" / "v1" / victim["image_path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    dest = tmp_path / "out" / "deeper"
    res = run_cli("export", "mvtec", "plates@v1", dest, "--root", root, "--option", "include_failed=true")
    assert_bad_input(res, contains=f"plates@v1/{victim['image_path']}: sha256 mismatch")
    assert not (tmp_path / "out").exists()  # not even the parent folders it created

    # an existing export is left as it was when a replacement is refused
    good = run_cli("export", "mvtec", "plates@v1", tmp_path / "kept", "--root", built)
    assert good.exit_code == 0, good.stderr
    before = tree(tmp_path / "kept")
    res = run_cli("export", "mvtec", "plates@v1", tmp_path / "kept", "--root", root, "--overwrite",
                  "--option", "include_failed=true")
    assert_bad_input(res, contains=victim["image_path"])
    assert tree(tmp_path / "kept") == before
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["plates"]


def test_bad_export_requests_exit_2_with_one_line_and_write_nothing(built, tmp_path):
    dest = tmp_path / "d"
    assert_bad_input(run_cli("export", "coco-ish", "plates@v1", dest, "--root", built),
                     contains="unknown export format 'coco-ish'; accepted: coco, croissant, dicom, hf, monai, mvtec, nnunet, yolo")
    assert_bad_input(run_cli("export", "mvtec", "plates@v1", dest, "--root", built, "--option", "colour=red"),
                     contains="no option 'colour'; accepted: class_name (str), include_failed (bool)")
    assert_bad_input(run_cli("export", "mvtec", "plates@v1", dest, "--root", built, "--option", "include_failed"),
                     contains="is not KEY=VALUE")
    assert_bad_input(run_cli("export", "mvtec", "plates@v1", dest, "--root", built, "--split", "holdout"),
                     contains="split 'holdout' is not in plates@v1; splits there: test, train, val")
    assert_bad_input(run_cli("export", "mvtec", "plates@v1", dest, "--root", built, "--classes", "nodule"),
                     contains="class 'nodule' is not a finding kind of plates@v1")
    assert_bad_input(run_cli("export", "mvtec", "plates@v9", dest, "--root", built),
                     contains="no published version 9")
    assert not dest.exists()
    assert run_cli("export", "mvtec", "plates@v1", dest, "--root", built).exit_code == 0
    before = tree(dest)
    assert_bad_input(run_cli("export", "mvtec", "plates@v1", dest, "--root", built, "--option", "include_failed=1"),
                     contains="already exists; pass --overwrite")
    assert tree(dest) == before
    res = run_cli("export", "mvtec", "plates@v1", dest, "--root", built, "--overwrite")
    assert res.exit_code == 0 and tree(dest) == before  # same version, same bytes


def test_export_mvtec_alias_says_it_is_deprecated_and_writes_the_same_bytes(built, tmp_path):
    res = run_cli("export-mvtec", "plates@v1", tmp_path / "old", "--class-name", "plate", "--root", built)
    assert res.exit_code == 0, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"note: export-mvtec is deprecated; use: pairforge export mvtec plates@v1 {tmp_path / 'old'} "
        "--option class_name=plate"]
    new = run_cli("export", "mvtec", "plates@v1", tmp_path / "new", "--option", "class_name=plate", "--root", built)
    assert new.exit_code == 0
    old_files, new_files = tree(tmp_path / "old"), tree(tmp_path / "new")
    old_files.pop("plate/pairforge_export.json"), new_files.pop("plate/pairforge_export.json")
    assert old_files == new_files and len(old_files) > 10


def test_a_format_registered_outside_the_project_reaches_the_command_line(built, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "_FORMATS", dict(export.formats()))  # registrations made here end with the test

    @export.register_exporter("id-list", summary="sample ids and image sha256, one line each",
                              options={"header": export.Option(bool, "first line names the columns", False)})
    def export_id_list(version, dest, *, split=None, classes=None, overwrite=False, header=False):
        lines = ["sample_id sha256"] if header else []
        with export.staged_folder(dest, overwrite=overwrite) as out:
            for i in export.selected(version, split, classes):
                data = version.file_bytes(i, "image")  # verified
                from store.codec import sha256
                lines.append(f"{version.row(i)['sample_id']} {sha256(data)}")
            (out / "ids.txt").write_text("\n".join(lines) + "\n")
        return {"path": str(dest), "counts": {"samples": len(lines) - header}}

    res = run_cli("export", "id-list", "plates@v1", tmp_path / "ids", "--root", built, "--split", "train",
                  "--option", "header=yes")
    assert res.exit_code == 0, res.stderr
    assert "(samples " in res.output
    lines = (tmp_path / "ids" / "ids.txt").read_text().splitlines()
    ds = DatasetStore(built).load("plates@v1", split="train")
    assert lines[0] == "sample_id sha256"
    assert lines[1:] == [f"{r['sample_id']} {r['image_sha256']}" for r in (ds.row(i) for i in range(len(ds)))]
    assert_bad_input(run_cli("export", "nope", "plates@v1", tmp_path / "x", "--root", built),
                     contains="accepted: coco, croissant, dicom, hf, id-list, monai, mvtec, nnunet, yolo")


FIXTURE = Path(__file__).resolve().parent / "fixtures" / "v1"  # versions published before image codecs existed


def test_a_version_published_before_codecs_exports_and_a_ct_version_is_refused(tmp_path):
    root = tmp_path / "root"
    shutil.copytree(FIXTURE, root)  # never write into the fixture
    res = run_cli("export", "mvtec", "legacy-surface@v1", tmp_path / "out", "--root", root,
                  "--option", "include_failed=true")
    assert res.exit_code == 0, res.stderr
    ds = DatasetStore(root).load("legacy-surface@v1")
    exported = {p.stem: p for p in (tmp_path / "out" / "legacy-surface").glob("t*/*/*.png")}
    assert sorted(exported) == sorted(ds.row(i)["sample_id"] for i in range(len(ds)))
    for i in range(len(ds)):
        p = exported[ds.row(i)["sample_id"]]
        assert np.array_equal(decode_png(p.read_bytes()), ds[i]["image"])
    # 16-bit HU images are not what MVTec AD loaders read: one line naming the codec, nothing written
    assert_bad_input(run_cli("export", "mvtec", "legacy-ct@v1", tmp_path / "ct", "--root", root),
                     contains="legacy-ct@v1 stores its images with codec 'hu16'")
    assert not (tmp_path / "ct").exists()
