"""MVTec AD export: walked the way DRAEM's / anomalib's folder loaders walk MVTec AD."""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from flows.pipeline import make_samples
from schemas.errors import SpecError
from schemas.spec import spec_hash, validate_spec
from store.mvtec import export_mvtec

SPEC = {"domain": "surface", "name": "plates", "samples": 24, "material": "cast_metal", "field_of_view_mm": 30,
        "image": {"size": 192, "color": "rgb"}, "watermark": False, "shard_size": 12,
        "splits": {"train": 0.6, "val": 0.1, "test": 0.3},
        "defects": {"negatives": 0.4, "mixture": ["scratch 3-8 mm", "2 pits 0.5-1 mm", "stain 2-4 mm",
                                                  {"kind": "dent", "diameter_mm": 3, "count": 1}]}}


@pytest.fixture(scope="module")
def samples():
    spec = validate_spec(SPEC)
    return spec, make_samples(spec, range(spec.samples))


def walk_like_mvtec_loaders(class_dir: Path):
    """DRAEM (MVTecDRAEMTrainDataset / MVTecDRAEMTestDataset) and anomalib's MVTec folder logic: train images are
    ``train/good/*.png``; test images ``test/*/*.png``; a test image's mask is
    ``ground_truth/<defect>/<stem>_mask.png``; good test images have no mask (an all-zero mask is assumed)."""
    train = sorted(glob.glob(os.path.join(class_dir, "train", "good", "*.png")))
    test = []
    for p in sorted(glob.glob(os.path.join(class_dir, "test", "*", "*.png"))):
        defect = os.path.basename(os.path.dirname(p))
        stem = os.path.splitext(os.path.basename(p))[0]
        mask_p = os.path.join(class_dir, "ground_truth", defect, stem + "_mask.png")
        img = cv2.imread(p, cv2.IMREAD_COLOR)
        if defect == "good":
            assert not os.path.exists(mask_p)
            mask = np.zeros(img.shape[:2], np.uint8)
        else:
            mask = cv2.imread(mask_p, cv2.IMREAD_GRAYSCALE)
        test.append((stem, defect, img, mask))
    return train, test


def _check_export(class_dir: Path, samples):
    by_id = {s.sample_id: s for s in samples}
    train, test = walk_like_mvtec_loaders(class_dir)
    assert train and test
    for p in train:
        s = by_id[Path(p).stem]
        assert not s.requested and s.split in ("train", "val")
    seen_defects = set()
    for stem, defect, img, mask in test:
        s = by_id[stem]
        assert img.shape[:2] == s.label.shape and mask.shape == s.label.shape
        assert set(np.unique(mask)) <= {0, 255}
        if defect == "good":
            assert not s.requested and s.split == "test"
        else:
            seen_defects.add(defect)
            kinds = {f["kind"] for f in s.requested}
            assert defect == (kinds.pop() if len(kinds) == 1 else "combined")
            assert np.array_equal(mask == 255, (s.instance > 0))  # the mask is the defect label, pixel for pixel
    n_defect = sum(1 for s in samples if s.requested and s.qc["passed"])
    assert sum(1 for t in test if t[1] != "good") == n_defect
    assert len(seen_defects) >= 3
    summary = json.loads((class_dir / "pairforge_export.json").read_text())
    assert summary["mask_values"] == [0, 255]


def test_export_from_samples_reads_like_mvtec_ad(tmp_path, samples):
    spec, ss = samples
    summary = export_mvtec(ss, tmp_path / "mvtec", "cast_plate")
    _check_export(tmp_path / "mvtec" / "cast_plate", ss)
    assert summary["counts"].get("train/good", 0) > 0
    assert not any(p.name.startswith(".") for p in (tmp_path / "mvtec").iterdir())  # no partial folder left


def test_export_from_a_published_version_folder(tmp_path, samples):
    from store import DatasetStore

    spec, ss = samples
    st = DatasetStore(tmp_path / "datasets")
    b = st.open_build(spec, json.dumps(SPEC), spec_hash(spec), "test")
    for i, shard in enumerate(b.shards):
        b.write_shard(i, [s for s in ss if s.index in shard])
    b.publish("test-run")
    version_dir = tmp_path / "datasets" / spec.name / "v1"
    assert (version_dir / "samples.parquet").is_file()
    export_mvtec(version_dir, tmp_path / "mvtec", "cast_plate")
    class_dir = tmp_path / "mvtec" / "cast_plate"
    _check_export(class_dir, ss)
    # images are the published files, byte for byte
    some = sorted((class_dir / "train" / "good").glob("*.png"))[0]
    assert some.read_bytes() == (version_dir / "images" / some.name).read_bytes()
    # the same export by reference, as `pairforge export-mvtec plates@v1 DEST --class-name ...` calls it
    export_mvtec(f"{spec.name}@v1", tmp_path / "by_ref", class_name="cast_plate", root=tmp_path / "datasets")
    _check_export(tmp_path / "by_ref" / "cast_plate", ss)


def test_export_refuses_to_overwrite_and_bad_sources_are_one_line_errors(tmp_path, samples):
    spec, ss = samples
    export_mvtec(ss[:4], tmp_path, "a")
    with pytest.raises(SpecError, match="already exists"):
        export_mvtec(ss[:4], tmp_path, "a")
    with pytest.raises(SpecError, match="not a published pairforge version"):
        export_mvtec(tmp_path / "nowhere", tmp_path, "b")
    with pytest.raises(SpecError, match="class name"):
        export_mvtec(ss[:4], tmp_path, "../x")
    assert not (tmp_path / "b").exists()
