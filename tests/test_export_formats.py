"""nnU-Net, COCO, MONAI and Hugging Face exports of a published chest-CT and a surface version, each read back by the
consumer's own library (nnU-Net's integrity check and readers, pycocotools, MONAI's datalist loader and LoadImaged,
``datasets.load_from_disk``) and compared with the version pixel for pixel and id for id."""
from __future__ import annotations

import json
import sys
import os
from pathlib import Path

import numpy as np
import pytest

from flows.pipeline import make_samples
from schemas.errors import SpecError
from schemas.spec import spec_hash, validate_spec
from store import DatasetStore, codec, codecs
from store.export import export_version, formats
from store.read import VersionDataset
from store.root import resolve_root

CT = {"name": "tiny-ct", "domain": "chest_ct", "samples": 8, "seed": 3, "shard_size": 4,
      "image": {"size": 256, "spacing_mm": [1.2, 1.4]},
      "splits": {"train": 0.5, "val": 0.2, "test": 0.3},
      "findings": {"negatives": 0.2, "mixture": ["8mm solid nodule, right upper lobe",
                                                 "2 solid nodules 6-9 mm, left lower lobe", "12 mm GGN in the RLL"]}}
SURFACE = {"name": "plates", "domain": "surface", "samples": 8, "material": "cast_metal", "field_of_view_mm": 30,
           "image": {"size": 128, "color": "rgb"}, "shard_size": 4, "splits": {"train": 0.5, "val": 0.2, "test": 0.3},
           "defects": {"negatives": 0.25, "mixture": ["scratch 3-8 mm", "2 pits 1-1.5 mm", "stain 2-4 mm"]}}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A store holding tiny-ct@v1 and plates@v1, published from real generated samples."""
    d = tmp_path_factory.mktemp("exports") / "datasets"
    for raw in (CT, SURFACE):
        spec = validate_spec(raw)
        samples = make_samples(spec, range(spec.samples))
        b = DatasetStore(d).open_build(spec, json.dumps(raw), spec_hash(spec), "test")
        for i, shard in enumerate(b.shards):
            b.write_shard(i, [s for s in samples if s.index in shard])
        b.publish("test-run")
    return d


def version(root, name) -> VersionDataset:
    return VersionDataset(resolve_root(root), name, 1)


def by_id(ds: VersionDataset) -> dict[str, dict]:
    """sample_id -> the sample as the verified reader gives it, with its position in the version as "pos"."""
    return {ds.row(i)["sample_id"]: dict(ds[i], pos=i) for i in range(len(ds))}


def check_provenance(folder: Path, ds: VersionDataset) -> None:
    prov = json.loads((folder / "PROVENANCE.json").read_text())
    assert prov["dataset"] == ds.name and prov["version"] == 1 and prov["synthetic"] is True
    assert prov["content_digest"] == ds.manifest.content_digest and len(prov["manifest_sha256"]) == 64
    assert prov["watermark"]["dataset_id"] == ds.manifest.watermark.dataset_id and prov["license"]
    readme = (folder / "README.md").read_text()
    assert prov["manifest_sha256"] in readme and "Synthetic data" in readme and "watermark" in readme


@pytest.fixture(autouse=True)
def _no_leaked_log_handlers():
    """mlcroissant imports absl, whose logging handler on the root logger keeps the stream pytest captured for this
    test; once pytest closes it, any later log line (Prefect's, in other test files) fails. Drop handlers a test added."""
    import logging

    before = list(logging.root.handlers)
    yield
    for h in list(logging.root.handlers):
        if h not in before:
            logging.root.removeHandler(h)
    absl_logging = sys.modules.get("absl.logging")
    if absl_logging is not None:  # its handler was built on the stream pytest captured during this test
        absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__


def test_every_format_is_registered():
    assert {"mvtec", "nnunet", "coco", "monai", "hf", "croissant", "yolo"} <= set(formats())


@pytest.mark.parametrize("name", ["tiny-ct", "plates"])
def test_nnunet_export_passes_nnunets_integrity_check_and_reads_back_exactly(root, name, tmp_path, monkeypatch):
    raw = tmp_path / "nnUNet_raw"
    for var, sub in (("nnUNet_raw", raw), ("nnUNet_preprocessed", tmp_path / "pre"),
                     ("nnUNet_results", tmp_path / "res")):
        monkeypatch.setenv(var, str(sub))
    pytest.importorskip("nnunetv2", reason="nnunetv2 is not in the dev extra (it pulls the argparse backport that "
                                           "breaks Prefect's local server); install it on its own to run this check")
    out = export_version(root, f"{name}@v1", "nnunet", raw, dataset_id=17)
    folder = Path(out["path"])
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    verify_dataset_integrity(str(folder), num_processes=1)  # raises on any problem
    dj = json.loads((folder / "dataset.json").read_text())
    ds = version(root, name)
    samples = by_id(ds)
    case0 = sorted((folder / "imagesTr").iterdir())[0]
    rw = determine_reader_writer_from_dataset_json(dj, str(case0))()
    new_of_old = {old: int(new) for new, old in dj["pairforge_label_ids"].items()}
    assert dj["labels"]["background"] == 0
    assert {dj["pairforge_label_names"][str(new)] for new in new_of_old.values()} == set(ds.manifest.class_table.values())
    seen = 0
    for sub_img, sub_lab in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        for p in sorted((folder / sub_img).iterdir()):
            case = p.name[: -len("_0000" + dj["file_ending"])]
            sid = case.split("_")[-1]
            s = samples[sid]
            assert (sub_img == "imagesTr") == (s["split"] in ("train", "val"))
            img, props = rw.read_images([str(p)])
            seg, _ = rw.read_seg(str(folder / sub_lab / f"{case}{dj['file_ending']}"))
            want = s["image"] if s["image"].ndim == 2 else np.moveaxis(s["image"], -1, 0)
            assert np.array_equal(img.reshape(want.shape), want)  # pixel for pixel (HU floats or u8)
            lab = np.zeros_like(s["label"])
            for old, new in new_of_old.items():
                lab[s["label"] == old] = new
            assert np.array_equal(seg.reshape(s["label"].shape), lab)  # id for id, through the consecutive map
            if dj["file_ending"] == ".nii.gz":
                assert np.allclose(props["spacing"][-2:], [s["spacing_mm"]] * 2)
            seen += 1
    assert seen == sum(1 for i in range(len(ds)) if ds[i]["qc_passed"])
    assert dj["numTraining"] == len(list((folder / "labelsTr").iterdir()))
    assert dj["file_ending"] == (".nii.gz" if name == "tiny-ct" else ".png")
    assert folder.name == ("Dataset017_TinyCt" if name == "tiny-ct" else "Dataset017_Plates")
    assert sorted(dj["labels"].values()) == list(range(len(dj["labels"])))
    check_provenance(folder, ds)


@pytest.mark.parametrize("name", ["tiny-ct", "plates"])
def test_coco_annotations_give_back_every_instance_mask(root, name, tmp_path):
    from pycocotools.coco import COCO

    folder = Path(export_version(root, f"{name}@v1", "coco", tmp_path)["path"])
    ds = version(root, name)
    samples = by_id(ds)
    n_ann = n_img = 0
    for f in sorted((folder / "annotations").glob("instances_*.json")):
        coco = COCO(str(f))
        cat_names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
        for img in coco.loadImgs(coco.getImgIds()):
            s = samples[img["sample_id"]]
            n_img += 1
            assert img["pixel_spacing_mm"] == pytest.approx(s["spacing_mm"])
            assert (folder / img["file_name"]).read_bytes() == ds.file_bytes(s["pos"], "image")
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
            ids = sorted(int(v) for v in np.unique(s["instance"]) if v)
            assert sorted(a["pairforge_instance"] for a in anns) == ids
            kinds = {f["instance"]: f["kind"] for f in s["requested"]}
            for a in anns:
                assert np.array_equal(coco.annToMask(a).astype(bool), s["instance"] == a["pairforge_instance"])
                assert cat_names[a["category_id"]] == kinds[a["pairforge_instance"]]
                n_ann += 1
    assert n_img == sum(1 for i in range(len(ds)) if ds[i]["qc_passed"]) and n_ann > 0
    check_provenance(folder, ds)


@pytest.mark.parametrize("name", ["tiny-ct", "plates"])
def test_monai_datalist_loads_with_spacing_and_exact_arrays(root, name, tmp_path):
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImaged

    folder = Path(export_version(root, f"{name}@v1", "monai", tmp_path)["path"])
    ds = version(root, name)
    samples = by_id(ds)
    load = LoadImaged(keys=["image", "label"], image_only=False, dtype=None)  # keep the stored dtype
    n = 0
    for key in ("training", "validation", "test"):
        for item in load_decathlon_datalist(str(folder / "dataset.json"), True, key, base_dir=str(folder)):
            d = load(item)
            s = samples[item["sample_id"]]
            img = np.asarray(d["image"])
            img = np.swapaxes(img, 0, 1)  # stored (i, j) = (column, row)
            assert img.dtype == s["image"].dtype and np.array_equal(img, s["image"])
            assert np.array_equal(np.swapaxes(np.asarray(d["label"]), 0, 1), s["label"])
            assert np.allclose(np.asarray(d["image"].pixdim)[:2], s["spacing_mm"])
            n += 1
    assert n == sum(1 for i in range(len(ds)) if ds[i]["qc_passed"])
    check_provenance(folder, ds)


@pytest.mark.parametrize("name", ["tiny-ct", "plates"])
def test_hugging_face_folder_opens_with_image_and_classlabel_features(root, name, tmp_path):
    import datasets as hfd

    folder = Path(export_version(root, f"{name}@v1", "hf", tmp_path)["path"])
    dd = hfd.load_from_disk(str(folder))
    ds = version(root, name)
    samples = by_id(ds)
    n = 0
    for split, part in dd.items():
        feats = part.features
        assert isinstance(feats["image"], hfd.Image) and isinstance(feats["label"], hfd.Image)
        kind_names = feats["finding_kinds"].feature.names
        assert set(kind_names) >= {f["kind"] for s in samples.values() for f in s["requested"]}
        for row in part:
            s = samples[row["sample_id"]]
            assert s["split"] == split
            stored = codecs.codec_for_row(ds.row(s["pos"])).from_bytes(ds.file_bytes(s["pos"], "image"))
            assert np.array_equal(np.asarray(row["image"]), stored)
            assert np.array_equal(codecs.codec_for_row(ds.row(s["pos"])).decode(np.asarray(row["image"])),
                                  s["image"])
            assert np.array_equal(np.asarray(row["label"]), s["label"])
            assert np.array_equal(np.asarray(row["instance"]), s["instance"])
            assert [kind_names[k] for k in row["finding_kinds"]] == [f["kind"] for f in s["requested"]]
            got = {f["instance"]: f for f in row["findings"]}
            for m in s["measured"]:
                assert got[m["instance"]]["area_mm2"] == pytest.approx(m["area_mm2"])
                assert kind_names[got[m["instance"]]["kind"]] == m["kind"]
            n += 1
    assert n == sum(1 for i in range(len(ds)) if ds[i]["qc_passed"])
    check_provenance(folder, ds)


def test_a_refused_export_writes_nothing(root, tmp_path):
    with pytest.raises(SpecError, match="dataset_id"):
        export_version(root, "plates@v1", "nnunet", tmp_path / "x", dataset_id=1000)
    with pytest.raises(SpecError, match="split 'holdout'"):
        export_version(root, "plates@v1", "coco", tmp_path / "x", split="holdout")
    export_version(root, "plates@v1", "coco", tmp_path / "x")
    with pytest.raises(SpecError, match="already exists"):
        export_version(root, "plates@v1", "coco", tmp_path / "x")
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["plates_v1"]
    assert not (tmp_path / "x" / "Dataset1000_Plates").exists()


@pytest.mark.parametrize("name", ["tiny-ct", "plates"])
def test_croissant_metadata_validates_and_iterates_record_by_record(root, name, tmp_path):
    import mlcroissant as mlc

    out = export_version(root, f"{name}@v1", "croissant", tmp_path)
    folder = Path(out["path"])
    assert out["warnings"] == []
    dataset = mlc.Dataset(str(folder / "croissant.json"))  # validates; raises on errors
    issues = dataset.metadata.ctx.issues
    assert not issues.errors and not issues.warnings, issues.report()
    doc = json.loads((folder / "croissant.json").read_text())
    assert "Synthetic data" in doc["rai:dataCollection"] and doc["rai:dataCollectionType"] in ("Synthetic data", ["Synthetic data"])
    assert doc["license"] and doc["conformsTo"]
    ds = version(root, name)
    samples = by_id(ds)
    n = 0
    for rec in dataset.records("samples"):
        s = samples[rec["samples/sample_id"].decode()]
        assert rec["samples/split"].decode() == s["split"]
        assert rec["samples/pixel_spacing_mm"] == pytest.approx(s["spacing_mm"])
        kinds = rec["samples/finding_kinds"]
        assert (kinds.decode().split(";") if kinds else []) == [f["kind"] for f in s["requested"]]
        measured = json.loads(rec["samples/findings_json"])
        assert [m["area_mm2"] for m in measured] == [m["area_mm2"] for m in s["measured"]]
        n += 1
    assert n == sum(1 for i in range(len(ds)) if ds[i]["qc_passed"])
    for rec in dataset.records("labels"):  # mlcroissant hands PNGs over as 8-bit RGB: class ids fit
        s = samples[rec["labels/sample_id"].decode()]
        assert np.array_equal(np.asarray(rec["labels/content"])[..., 0], s["label"])
    for rec in dataset.records("images"):
        s = samples[rec["images/sample_id"].decode()]
        path = folder / "images" / f"{s['sample_id']}.png"
        assert path.read_bytes() == ds.file_bytes(s["pos"], "image")  # the published file, byte for byte
        if s["image"].dtype == np.uint8:  # 8-bit images survive mlcroissant's RGB conversion exactly
            assert np.array_equal(np.asarray(rec["images/content"]), s["image"])
    check_provenance(folder, ds)


def test_yolo_polygons_parse_and_fill_back_to_the_defect_masks(root, tmp_path):
    import cv2
    import yaml

    folder = Path(export_version(root, "plates@v1", "yolo", tmp_path)["path"])
    data = yaml.safe_load((folder / "data.yaml").read_text())
    ds = version(root, "plates")
    samples = by_id(ds)
    names = data["names"]
    assert data["nc"] == len(names) and set(names.values()) == {f["kind"] for s in samples.values()
                                                                 for f in s["requested"]}
    n_img = n_obj = 0
    for split in ("train", "val", "test"):
        for img_path in sorted((folder / data[split]).glob("*.png")) if split in data else []:
            s = samples[img_path.stem]
            assert s["split"] == split and img_path.read_bytes() == ds.file_bytes(s["pos"], "image")
            h, w = s["instance"].shape
            lines = (folder / "labels" / split / f"{img_path.stem}.txt").read_text().splitlines()
            drawn = np.zeros((h, w), np.uint8)
            kinds = set()
            for line in lines:
                parts = line.split()
                xy = np.array(parts[1:], float).reshape(-1, 2)
                assert len(xy) >= 3 and (0 <= xy).all() and (xy <= 1).all()
                kinds.add(names[int(parts[0])])
                cv2.fillPoly(drawn, [np.round(xy * [w, h]).astype(np.int32)], 1)
                n_obj += 1
            assert kinds == {f["kind"] for f in s["requested"]}
            truth = s["instance"] > 0
            if truth.any():
                iou = (truth & (drawn > 0)).sum() / (truth | (drawn > 0)).sum()
                assert iou >= 0.98, (img_path.stem, iou)  # the polygons trace every boundary pixel
            else:
                assert not lines
            n_img += 1
    assert n_img == sum(1 for i in range(len(ds)) if ds[i]["qc_passed"]) and n_obj > 0
    check_provenance(folder, ds)
    with pytest.raises(SpecError, match="8-bit"):
        export_version(root, "tiny-ct@v1", "yolo", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
