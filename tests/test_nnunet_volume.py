"""nnU-Net v2 export of 3-D chest-CT volumes: `imagesTr/<Name>_<id>_0000.nii.gz` with the version's spacing and
affine, `labelsTr/` with consecutive ids and the same geometry, `dataset.json`; read back with nibabel (always) and
with nnU-Net's own readers plus its dataset integrity check (where nnunetv2 is installed), voxel for voxel against
the loaded version."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

SPEC = """\
name: vol-nn
domain: chest_ct_volume
samples: 2
seed: 5
shard_size: 2
splits: {train: 0.4, val: 0.1, test: 0.5}
volume: {size: [12, 128, 128], spacing_mm: [5.0, 2.8, 2.8]}
findings:
  negatives: 0.5
  mixture: ["solid nodule 8 mm"]
"""
SPACING_ZYX = (5.0, 2.8, 2.8)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """A published 2-volume version (generated and published in-process) and its nnU-Net export."""
    from flows.pipeline import make_samples
    from schemas.spec import load_spec_text, spec_hash
    from store import DatasetStore
    from store.export import export_version

    tmp = tmp_path_factory.mktemp("nnvol")
    spec = load_spec_text(SPEC)
    samples = make_samples(spec, range(spec.samples), digest=spec_hash(spec))
    st = DatasetStore(str(tmp / "root"))
    b = st.open_build(spec, SPEC, spec_hash(spec), "test-code-vol")
    for i, r in enumerate(b.shards):
        b.write_shard(i, [samples[j] for j in r])
    b.publish(run_id="nnunet-volume")
    out = export_version(str(tmp / "root"), "vol-nn@v1", "nnunet", tmp / "nnUNet_raw", dataset_id=42,
                         include_failed=True)
    ds = st.load("vol-nn@v1")
    return {"tmp": tmp, "folder": Path(out["path"]), "out": out, "ds": ds,
            "samples": {ds[i]["sample_id"]: ds[i] for i in range(len(ds))}}


def _cases(folder: Path):
    for img_dir, lab_dir in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        for p in sorted((folder / img_dir).iterdir()):
            case = p.name[: -len("_0000.nii.gz")]
            yield img_dir, p, folder / lab_dir / f"{case}.nii.gz", case.rsplit("_", 1)[-1]


def _remapped(label: np.ndarray, dj: dict) -> np.ndarray:
    out = np.zeros_like(label)
    for new, old in dj["pairforge_label_ids"].items():
        out[label == old] = int(new)
    return out


def test_volume_export_layout_and_dataset_json(volumes):
    folder, ds = volumes["folder"], volumes["ds"]
    assert folder.name == "Dataset042_VolNn"
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["file_ending"] == ".nii.gz" and dj["channel_names"] == {"0": "CT"}
    assert dj["labels"]["background"] == 0 and sorted(dj["labels"].values()) == list(range(len(dj["labels"])))
    assert set(dj["pairforge_label_names"].values()) == set(ds.manifest.class_table.values())
    cases = list(_cases(folder))
    assert len(cases) == len(ds) == 2
    assert dj["numTraining"] == sum(1 for c in cases if c[0] == "imagesTr")
    for img_dir, _, _, sid in cases:
        assert (img_dir == "imagesTr") == (volumes["samples"][sid]["split"] in ("train", "val"))
    assert volumes["out"]["dims"] == 3 and volumes["out"]["spacing_zyx_mm"] == pytest.approx(SPACING_ZYX)
    prov = json.loads((folder / "PROVENANCE.json").read_text())
    assert prov["ref"] == "vol-nn@v1" and prov["synthetic"] is True and prov["samples_exported"] == 2


def test_volume_export_reads_back_with_nibabel_voxel_for_voxel_with_spacing_and_affine(volumes):
    import nibabel as nib

    folder = volumes["folder"]
    dj = json.loads((folder / "dataset.json").read_text())
    for _, img_path, lab_path, sid in _cases(folder):
        s = volumes["samples"][sid]
        img, lab = nib.load(img_path), nib.load(lab_path)
        assert img.shape == s["image"].shape[::-1] == lab.shape  # (i, j, k)
        assert np.array_equal(np.asarray(img.dataobj).transpose(2, 1, 0).astype(np.float32), s["image"])
        assert np.array_equal(np.asarray(lab.dataobj).transpose(2, 1, 0), _remapped(s["label"], dj))
        assert np.allclose(img.affine, s["affine"]) and np.allclose(lab.affine, img.affine)
        assert img.header.get_zooms() == pytest.approx(SPACING_ZYX[::-1])
        assert lab.header.get_data_dtype() == np.uint8 and img.header.get_data_dtype() == np.int16
        assert np.unique(np.asarray(lab.dataobj)).max() < len(dj["labels"])


def test_volume_export_passes_nnunets_integrity_check_and_its_readers_agree(volumes, monkeypatch):
    pytest.importorskip("nnunetv2", reason="nnunetv2 is not in the dev extra (it pulls the argparse backport that "
                                           "breaks Prefect's local server); install it on its own to run this check")
    tmp, folder = volumes["tmp"], volumes["folder"]
    for var, sub in (("nnUNet_raw", folder.parent), ("nnUNet_preprocessed", tmp / "pre"),
                     ("nnUNet_results", tmp / "res")):
        monkeypatch.setenv(var, str(sub))
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    verify_dataset_integrity(str(folder), num_processes=1)  # raises on any problem
    dj = json.loads((folder / "dataset.json").read_text())
    first = next(_cases(folder))[1]
    auto = determine_reader_writer_from_dataset_json(dj, str(first))()
    assert type(auto).__name__ == "SimpleITKIO"
    for rw in (auto, NibabelIO()):
        for _, img_path, lab_path, sid in _cases(folder):
            s = volumes["samples"][sid]
            img, props = rw.read_images([str(img_path)])
            seg, seg_props = rw.read_seg(str(lab_path))
            assert img.shape[0] == 1 and seg.shape[0] == 1
            # both readers hand over (z, y, x) arrays and spacings (NibabelIO transposes to SimpleITK's order)
            got_img, got_seg = img[0], seg[0]
            assert tuple(props["spacing"]) == pytest.approx(SPACING_ZYX)
            assert np.array_equal(got_img, s["image"])  # voxel for voxel, HU
            assert np.array_equal(got_seg, _remapped(s["label"], dj))  # id for id
            assert tuple(seg_props["spacing"]) == pytest.approx(tuple(props["spacing"]))
