"""The chest_ct_volume domain end to end through the product: validate, preview (tri-planar), a real Prefect build
through the CLI, show, verify, load (numpy, MONAI 3D dict, TorchIO subject) and `export dicom` read back by
highdicom and pydicom; volumes are NIfTI in the version (image, label and instance) with hashes and provenance."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
PAIRFORGE = [sys.executable, "-c", "import sys; from flows.cli import main; sys.argv[0] = 'pairforge'; main()"]

SPEC = """\
name: vol-small
domain: chest_ct_volume
samples: 2
seed: 3
shard_size: 1
volume: {size: [24, 128, 128], spacing_mm: [5.0, 2.8, 2.8]}
findings:
  negatives: 0
  mixture: ["solid nodule 10 mm RLL"]
"""
SHAPE, SPACING = (24, 128, 128), (5.0, 2.8, 2.8)


def test_volume_spec_is_a_registered_domain_and_bad_grids_are_one_line():
    from schemas.domain import get_domain
    from schemas.errors import SpecError
    from schemas.spec import load_spec_text, validate_spec

    d = get_domain("chest_ct_volume")
    assert d.codec == "nifti_hu16" and d.classes.names[25] == "stomach"
    spec = load_spec_text(SPEC)
    assert tuple(spec.volume.size) == SHAPE and spec.findings.mixture[0].location == "RLL"
    with pytest.raises(SpecError) as e:
        validate_spec({"name": "x", "domain": "chest_ct_volume", "samples": 1, "volume": {"size": [4, 128, 128]},
                       "findings": {"negatives": 1}})
    assert "volume" in str(e.value) and "8-1024" in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def built(prefect_api, tmp_path_factory):
    """The spec validated, previewed, built, shown, verified and exported to DICOM through the CLI."""
    tmp = tmp_path_factory.mktemp("vol")
    spec = tmp / "vol.yaml"
    spec.write_text(SPEC)
    env = dict(os.environ, PYTHONPATH=str(REPO), PREFECT_API_URL=prefect_api, OMP_NUM_THREADS="1")
    root = str(tmp / "root")
    out = {}

    def cli(*args: str) -> subprocess.CompletedProcess:
        r = subprocess.run(PAIRFORGE + list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        out[args[0]] = r
        return r

    assert cli("validate", str(spec)).returncode == 0, out["validate"].stderr
    assert cli("preview", str(spec), "--out", str(tmp / "pv"), "-n", "1").returncode == 0, out["preview"].stderr
    assert cli("build", str(spec), "--root", root).returncode == 0, out["build"].stdout + out["build"].stderr
    assert cli("show", "vol-small@v1", "--root", root).returncode == 0, out["show"].stderr
    assert cli("verify", "vol-small@v1", "--root", root).returncode == 0, out["verify"].stdout + out["verify"].stderr
    r = cli("export", "dicom", "vol-small@v1", str(tmp / "dicom"), "--root", root)
    assert r.returncode == 0, r.stdout + r.stderr
    return {"tmp": tmp, "root": root, "out": out, "spec": SPEC}


def test_preview_writes_nifti_and_a_triplanar_overlay(built):
    import cv2
    import nibabel as nib

    pv = built["tmp"] / "pv"
    img = nib.load(pv / "0000000_image.nii.gz")
    lab = nib.load(pv / "0000000_label.nii.gz")
    assert img.shape == SHAPE[::-1] and lab.shape == SHAPE[::-1]  # (i, j, k)
    assert np.allclose(np.abs(np.diag(img.affine))[:3], SPACING[::-1])
    ov = cv2.imread(str(pv / "0000000_overlay.png"))
    # axial 128 px + coronal and sagittal (128 px wide each at square pixels) side by side
    assert ov.shape[1] >= 3 * 128 and ov.shape[0] >= 128
    meta = json.loads((pv / "0000000.json").read_text())
    assert meta["measured"][0]["lobe"] == "RLL"


def test_build_stores_nifti_image_label_instance_with_hashes_and_verifies(built):
    from store import DatasetStore

    st = DatasetStore(built["root"])
    assert "chest_ct_volume" in built["out"]["show"].stdout
    assert "OK" in built["out"]["verify"].stdout
    m = st.manifest("vol-small")
    assert m.codecs["image"]["name"] == "nifti_hu16"
    assert "NIfTI" in m.encodings["label"] and "NIfTI" in m.encodings["instance"]
    rows = st.index("vol-small@v1").to_pylist()
    vdir = Path(built["root"]) / "vol-small" / "v1"
    for r in rows:
        assert r["image_path"].endswith(".nii.gz") and r["label_path"].endswith(".nii.gz")
        assert r["instance_path"].endswith(".nii.gz") and (r["width"], r["height"]) == (128, 128)
        img_bytes = (vdir / r["image_path"]).read_bytes()
        import hashlib

        assert hashlib.sha256(img_bytes).hexdigest() == r["image_sha256"]
        # provenance rides in the NIfTI comment extension
        import nibabel as nib

        ext = nib.Nifti1Image.from_bytes(gzip.decompress(img_bytes)).header.extensions
        prov = json.loads(ext[0].get_content())
        assert prov["dataset"] == "vol-small" and prov["sample_id"] == r["sample_id"] and prov["synthetic"] is True
    readme = (vdir / "README.md").read_text()
    assert "## Volume statistics" in readme and "| volumes | 2 |" in readme
    assert (vdir / "card" / "volume_statistics.png").is_file() and (vdir / "card" / "sample_grid.png").is_file()
    # a changed byte is caught
    victim = vdir / rows[0]["label_path"]
    data = bytearray(victim.read_bytes())
    orig = bytes(data)
    data[len(data) // 2] ^= 0xFF
    try:
        victim.write_bytes(bytes(data))
        rep = st.verify_version("vol-small@v1")
        assert not rep.ok and rows[0]["label_path"] in str(rep)
    finally:
        victim.write_bytes(orig)


def test_load_equals_generation_and_gives_monai_and_torchio_volumes(built):
    import torchio as tio
    from monai.data import MetaTensor
    from monai.transforms import EnsureChannelFirstd, LoadImaged

    from flows.pipeline import make_samples
    from schemas.spec import load_spec_text
    from store import DatasetStore

    st = DatasetStore(built["root"])
    ds = st.load("vol-small@v1")
    made = make_samples(load_spec_text(SPEC), range(2))
    vdir = Path(built["root"]) / "vol-small" / "v1"
    for i, (got, want) in enumerate(zip(ds, made)):
        assert got["image"].shape == SHAPE and got["label"].shape == SHAPE
        assert np.array_equal(got["label"], want.label) and np.array_equal(got["instance"], want.instance)
        # int16 rounding (0.5 HU) plus the per-slice watermark (at most 14 HU, none on findings)
        diff = np.abs(got["image"] - np.clip(want.image, -1024, 3071))
        assert diff.max() <= 14.5 and diff[want.instance > 0].max() <= 0.5
        assert [f["equivalent_diameter_mm"] for f in got["measured"]] == \
            [f["equivalent_diameter_mm"] for f in want.measured]
        assert np.allclose(got["affine"], np.asarray(want.params["layout"]["affine_ras"]))

        item = ds.monai_item(i)
        assert isinstance(item["image"], MetaTensor) and tuple(item["image"].shape) == (1, *SHAPE[::-1])
        assert np.allclose(item["pixdim"], SPACING[::-1])
        # the same as MONAI reading the stored NIfTI files itself
        row = ds.row(i)
        ref = EnsureChannelFirstd(["image", "label"])(LoadImaged(["image", "label"], image_only=True)(
            {"image": str(vdir / row["image_path"]), "label": str(vdir / row["label_path"])}))
        assert np.array_equal(np.asarray(ref["image"]), np.asarray(item["image"]))
        assert np.array_equal(np.asarray(ref["label"]), np.asarray(item["label"]))
        assert np.allclose(np.asarray(ref["image"].affine), np.asarray(item["image"].affine))

        subj = ds.torchio_subject(i)
        assert isinstance(subj, tio.Subject) and subj["image"].shape == (1, *SHAPE[::-1])
        assert np.allclose(subj["image"].spacing, SPACING[::-1])
        assert subj["image"].orientation == ("L", "P", "I")
        on_disk = tio.LabelMap(vdir / row["label_path"])
        assert np.array_equal(on_disk.numpy(), subj["label"].numpy())
    batch = next(iter(__import__("monai").data.DataLoader(ds.monai(), batch_size=2)))
    assert tuple(batch["image"].shape) == (2, 1, *SHAPE[::-1])


def test_dicom_export_reads_back_with_label_ids_and_geometry_of_the_nifti(built):
    import pydicom

    from store import DatasetStore
    from store.dicom_volume import read_seg_labels

    ds = DatasetStore(built["root"]).load("vol-small@v1")
    out = built["tmp"] / "dicom" / "vol-small"
    assert sorted(p.name for p in out.iterdir()) == ["0000000", "0000001"]
    for i in range(len(ds)):
        d = ds[i]
        folder = out / d["sample_id"]
        cts = sorted((folder / "ct").glob("*.dcm"))
        assert len(cts) == SHAPE[0]
        for p in [*cts, folder / "seg.dcm"]:
            pydicom.dcmread(p)  # every file is accepted
        first = pydicom.dcmread(cts[0])
        assert np.allclose([float(v) for v in first.PixelSpacing], SPACING[1:])
        hu = first.pixel_array.astype(np.float32) * float(first.RescaleSlope) + float(first.RescaleIntercept)
        assert np.array_equal(hu, d["image"][int(first.InstanceNumber) - 1])
        labels, positions = read_seg_labels(folder / "seg.dcm", cts)
        assert labels.shape == SHAPE and np.array_equal(labels, d["label"])
        # slice positions: the NIfTI RAS affine turned into LPS
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(d["affine"])
        want = np.array([(lps @ [0, 0, k, 1])[:3] for k in range(SHAPE[0])])
        assert np.allclose(positions, want, atol=1e-3)
        assert set(np.unique(labels)) == set(np.unique(d["label"])) and 20 in set(np.unique(labels))


def test_dicom_export_refuses_a_2d_version(tmp_path):
    from flows.pipeline import make_samples
    from schemas.errors import SpecError
    from schemas.spec import load_spec_text, spec_hash
    from store import DatasetStore
    from store.export import export_version

    text = "name: flat\ndomain: chest_ct\nsamples: 1\nshard_size: 1\nimage: {size: 128}\nfindings: {negatives: 1}\n"
    spec = load_spec_text(text)
    st = DatasetStore(str(tmp_path))
    staging = st.open_build(spec, text, spec_hash(spec), "test")
    staging.write_shard(0, make_samples(spec, range(1)))
    staging.publish()
    with pytest.raises(SpecError) as e:
        export_version(str(tmp_path), "flat@v1", "dicom", tmp_path / "out")
    assert "volumes only" in str(e.value) and not (tmp_path / "out").exists()
