"""Findings inserted into the user's own scans: reading (NIfTI, DICOM, PNG) and refusals, size and placement,
noise match (and a plain disc failing it), de-identification of published data, and a build from a folder of
sources that is SIGKILLed, resumed byte-identically and loaded."""
from __future__ import annotations

import math
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom")
pytest.importorskip("nibabel")

from bench.scan_fixtures import (LOBE_MASK_CLASSES, PHANTOM_SLICE_MM, PHANTOM_SPACING, ct_small_hu,  # noqa: E402
                                 ct_small_path, lobe_mask, phantom_volume, write_dicom_series, write_nifti,
                                 write_png_slices, write_source_folder)
from schemas.errors import PlacementError, SpecError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def phantom():
    return phantom_volume(seed=3, n_slices=3)


# --------------------------------------------------------------------------------------------- reading
def test_nifti_dicom_and_png_round_trips_give_the_same_hu_and_spacing(phantom, tmp_path):
    from generators.ct_sources import load_scan
    from schemas.source import CTSource

    hu, _ = phantom
    write_nifti(tmp_path / "v.nii.gz", hu, PHANTOM_SPACING, PHANTOM_SLICE_MM)
    write_dicom_series(tmp_path / "series", hu, PHANTOM_SPACING, PHANTOM_SLICE_MM)  # names in reverse position order
    write_png_slices(tmp_path / "png", hu)
    for path, kw in ((tmp_path / "v.nii.gz", {}), (tmp_path / "series", {}),
                     (tmp_path / "png", {"spacing_mm": PHANTOM_SPACING})):
        src = CTSource(path=str(path), **kw)
        scan = load_scan(src.units[0], src)
        assert scan.hu.shape == hu.shape
        assert abs(scan.spacing_mm - PHANTOM_SPACING) < 1e-5
        assert np.abs(scan.hu - np.rint(hu)).max() <= 1.0, path  # rounding to integer HU only


def test_ct_small_reads_as_hu_with_its_spacing_and_a_computed_lung_on_both_sides():
    from generators.ct_insert import scan_context

    hu, sp = ct_small_hu()
    assert abs(sp - 0.661468) < 1e-6 and hu.shape == (128, 128)
    ctx = scan_context(hu, sp)
    from schemas.classes import CT_IDS

    right = (ctx["region"] == CT_IDS["lung_right"]).sum()
    left = (ctx["region"] == CT_IDS["lung_left"]).sum()
    assert right > 1000 and left > 1000  # the two posterior lungs beside the spine
    assert np.median(hu[ctx["clean"]]) < -700


@pytest.mark.parametrize("case", ["mr", "no_spacing", "broken", "mri_nifti", "8bit_png"])
def test_bad_sources_exit_2_with_one_line_naming_the_file(case, tmp_path):
    import pydicom
    from typer.testing import CliRunner

    from flows.cli import app

    scans = tmp_path / "scans"
    scans.mkdir()
    if case in ("mr", "no_spacing"):
        ds = pydicom.dcmread(ct_small_path())
        if case == "mr":
            ds.Modality = "MR"
        else:
            del ds.PixelSpacing
        bad = scans / "s1" / "x.dcm"
        bad.parent.mkdir()
        ds.save_as(str(bad))
    elif case == "broken":
        bad = scans / "s1" / "x.dcm"
        bad.parent.mkdir()
        bad.write_bytes(b"not a dicom file at all" * 10)
    elif case == "mri_nifti":
        bad = scans / "mr.nii.gz"
        write_nifti(bad, np.random.default_rng(0).uniform(0, 900, (4, 64, 64)), 1.0, 3.0)
    else:
        import cv2

        bad = scans / "p" / "a.png"
        bad.parent.mkdir()
        cv2.imwrite(str(bad), np.zeros((64, 64), np.uint8))
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: bad\ndomain: chest_ct\nsamples: 2\nsource: {{path: {scans}, spacing_mm: 0.7}}\n"
                    "findings: {negatives: 0, mixture: ['6mm solid nodule']}\n")
    res = CliRunner().invoke(app, ["build", str(spec), "--root", str(tmp_path / "root")])
    err = res.stderr.strip()
    assert res.exit_code == 2, (res.output, err)
    assert len(err.splitlines()) == 1 and str(bad) in err, err
    assert not list((tmp_path / "root").glob("*/v*/manifest.json"))


def test_a_lobe_location_without_a_lobe_map_is_refused_and_approximate_lobes_are_recorded(tmp_path):
    from flows.pipeline import make_samples
    from schemas.spec import validate_spec

    base = {"name": "x", "domain": "chest_ct", "samples": 2, "seed": 1,
            "findings": {"negatives": 0, "mixture": [{"diameter_mm": 5, "location": "RLL"}]}}
    with pytest.raises(SpecError, match="RLL needs lobes"):
        validate_spec({**base, "source": {"path": ct_small_path()}})
    spec = validate_spec({**base, "source": {"path": ct_small_path(), "lobes": "approximate", "level": 0.7}})
    s = make_samples(spec, [0])[0]
    assert s.params["layout"]["source"]["lobes_approximate"] is True
    assert s.measured[0]["lobe"] == "RLL" and s.qc["passed"]


# --------------------------------------------------------------------------------------------- insertion
def _insert_many(n: int, mode: str, seed: int = 0):
    from annotators.ct_insertion import inner_region, mean_frequency, noise_measure
    from generators.ct_insert import insert_intensities, place_findings, scan_context

    hu, sp = ct_small_hu()
    ctx = scan_context(hu, sp)
    out = []
    for t in range(n):
        rng = np.random.default_rng([seed, t])
        f = {"kind": "solid", "diameter_mm": float(rng.uniform(5.5, 8)), "location": "any", "margin": "smooth",
             "juxtapleural": False}
        label, inst = ctx["label"].copy(), np.zeros(hu.shape, np.uint16)
        try:
            placed = place_findings(ctx["region"], ctx["vessels"], [f], sp, rng, label, inst)
        except PlacementError:
            continue
        img, _ = insert_intensities(hu, ctx["clean"], placed, sp, ctx["noise"], np.random.default_rng([9, t]), mode,
                                    ctx["psf_sigma_px"])
        nm = noise_measure(img, inner_region(label, inst, placed[0], ctx["psf_sigma_px"]), ctx["clean"] & (inst == 0), sp,
                           placed[0]["shape"]["radius_px"] + 0.75)
        if nm:
            out.append(nm)
    std = math.sqrt(np.mean([n["var_in"] for n in out]) / np.mean([n["var_ref"] for n in out]))
    nps_in, nps_ref = sum(n["nps_in"] for n in out), sum(n["nps_ref"] for n in out)
    freq = mean_frequency(nps_in, sp) / mean_frequency(nps_ref, sp)
    # Power per radial frequency band (4 bands up to the corner frequency), inserted / surrounding.
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(64, sp), np.fft.fftfreq(64, sp)))
    bands = np.minimum((f / f.max() * 4).astype(int), 3)
    band_ratio = [float(nps_in[bands == b].sum() / nps_ref[bands == b].sum()) for b in range(4)]
    return len(out), std, freq, band_ratio


def test_matched_insertion_has_the_parenchymas_noise_std_and_nps_and_a_plain_disc_has_neither():
    n, std, freq, bands = _insert_many(80, "matched")
    assert n >= 30
    assert abs(std - 1) <= 0.15 and abs(freq - 1) <= 0.1, (std, freq)  # the bench pools ~300 for the +-10 %
    assert all(0.5 < b < 2.0 for b in bands), bands  # the spectrum's shape, band by band (top band: little power)
    _, std_d, _, bands_d = _insert_many(80, "disc")
    # A smooth disc has almost no noise, so no band of its spectrum comes near the parenchyma's.
    assert std_d < 0.2 and max(bands_d) < 0.05, (std_d, bands_d)
    _, std_w, freq_w, _ = _insert_many(80, "disc_white")
    assert abs(freq_w - 1) > 0.2, freq_w  # white noise of the right std still has the wrong spectrum


def test_inserted_nodules_have_the_requested_size_inside_the_requested_lobe_off_vessels(phantom):
    from annotators.ct_insertion import annotate_insertion
    from generators.ct_insert import insert_intensities, place_findings, scan_context
    from schemas.sample import Layout, SampleRequest
    from schemas.spec import QCSpec

    hu, lab = phantom
    ctx = scan_context(hu[1], PHANTOM_SPACING, lobe_mask(lab[1]), "masks")
    done = 0
    for t in range(30):
        rng = np.random.default_rng(t)
        f = {"kind": ("solid", "ground_glass", "part_solid")[t % 3], "diameter_mm": float(rng.uniform(3, 12)),
             "location": ("RLL", "LLL", "LUL")[t % 3], "margin": ("smooth", "lobulated", "spiculated")[t % 3],
             "juxtapleural": False}
        label, inst = ctx["label"].copy(), np.zeros(hu[1].shape, np.uint16)
        try:
            placed = place_findings(ctx["region"], ctx["vessels"], [f], PHANTOM_SPACING, rng, label, inst)
        except PlacementError:
            continue
        img, _ = insert_intensities(hu[1], ctx["clean"], placed, PHANTOM_SPACING, ctx["noise"], rng, "matched",
                                    ctx["psf_sigma_px"])
        lay = Layout(label=label, instance=inst, spacing_mm=PHANTOM_SPACING, findings=placed, params={},
                     extras={k: ctx[k] for k in ("region", "vessels", "clean")})
        req = SampleRequest(index=t, sample_id="x", split="train", domain="chest_ct", spacing_mm=PHANTOM_SPACING,
                            size=hu[1].shape, findings=[f])
        m = annotate_insertion(img, lay, req, QCSpec()).measured[0]
        assert abs(m["equivalent_diameter_mm"] - f["diameter_mm"]) <= max(0.5, PHANTOM_SPACING)
        assert m["lobe"] == f["location"] and m["ring_in_region_fraction"] >= 0.99
        assert m["vessel_overlap_px"] == 0
        done += 1
    assert done >= 20


# --------------------------------------------------------------------------------------------- privacy and flows
IDENTIFYING = {"PatientName": "Quixote^Dulcinea^Secret", "PatientID": "PID-88412-XZ",
               "PatientBirthDate": "19391207", "InstitutionName": "Saint Elsewhere Hospital",
               "StudyDate": "19990412", "StudyDescription": "CHEST LOWDOSE SCREENING 77",
               "ReferringPhysicianName": "Watson^Ormond", "AccessionNumber": "ACC99817236"}


def _spec_text(name: str, scans: str, masks: str, samples: int, shard: int) -> str:
    classes = ", ".join(f"{k}: {v}" for k, v in LOBE_MASK_CLASSES.items())
    return (f"name: {name}\ndomain: chest_ct\nsamples: {samples}\nseed: 5\nshard_size: {shard}\n"
            f"source: {{path: {scans}, masks: {masks}, mask_classes: {{{classes}}}}}\n"
            "findings:\n  negatives: 0.1\n  mixture:\n"
            "    - {kind: solid, diameter_mm: [4, 7], location: right}\n"
            "    - {kind: ground_glass, diameter_mm: [5, 8], location: left}\n"
            "    - {kind: part_solid, diameter_mm: [6, 8], location: any, margin: lobulated}\n")


def test_published_version_carries_no_dicom_patient_study_institution_or_date(prefect_api, tmp_path):
    from flows.build import run_build

    hu, _ = phantom_volume(seed=5, n_slices=2)
    scans = tmp_path / "in" / "scans"
    write_dicom_series(scans / "series_a", hu, PHANTOM_SPACING, PHANTOM_SLICE_MM, extra=IDENTIFYING)
    import shutil

    (scans / "slice_b").mkdir()
    shutil.copy(ct_small_path(), scans / "slice_b" / "a.dcm")  # CT_small's own patient/institution/date
    (tmp_path / "in" / "masks").mkdir()
    s = run_build(_spec_text("deid", str(scans), str(tmp_path / "in" / "masks"), 12, 6), root=str(tmp_path / "out"),
                  runner="threads", workers=1)
    vdir = tmp_path / "out" / "deid" / f"v{s['version']}"
    blob = b"".join(p.read_bytes() for p in sorted(vdir.rglob("*")) if p.is_file())
    import pydicom

    small = pydicom.dcmread(ct_small_path())
    needles = list(IDENTIFYING.values()) + [str(small.PatientName), str(small.PatientID), small.InstitutionName,
                                            small.StudyDate, str(small.StudyInstanceUID)]
    assert len(blob) > 100_000
    for needle in needles:
        for form in {needle, needle.replace("^", " "), needle.lower()}:
            assert form.encode() not in blob, form
    # What is recorded instead: the source's sha256 and geometry.
    import pyarrow.parquet as pq

    rows = pq.read_table(vdir / "samples.parquet").to_pylist()
    assert {r["group"] for r in rows} and all(r["group"].startswith("src-") for r in rows)
    params = rows[0]["generator"]["params_json"]
    assert '"sha256"' in params and '"geometry"' in params


def test_a_200_sample_build_from_a_folder_of_sources_is_killed_resumed_identical_and_loads(prefect_api, tmp_path):
    import subprocess
    import sys

    src = write_source_folder(tmp_path / "in", n_phantoms=2)
    spec = tmp_path / "s.yaml"
    spec.write_text(_spec_text("realsrc", src["scans"], src["masks"], 200, 25))  # 8 shards, 3 sources
    pf = [sys.executable, "-c", "import sys; from flows.cli import main; sys.argv[0] = 'pairforge'; main()"]
    env = dict(os.environ, PREFECT_API_URL=prefect_api, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    root_a, root_b = tmp_path / "killed", tmp_path / "clean"
    args = ["build", str(spec), "--root", str(root_a), "--runner", "processes", "--workers", "1"]
    proc = subprocess.Popen(pf + args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(root_a.glob("realsrc/_staging/*/parts/shard-*.done.json"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done = len(list(root_a.glob("realsrc/_staging/*/parts/shard-*.done.json")))
    assert 2 <= done < 8
    out = subprocess.run(pf + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"shards: (\d+) generated, (\d+) reused \(of 8\)", out.stdout)
    assert m and (int(m.group(1)), int(m.group(2))) == (8 - done, done), out.stdout
    clean = subprocess.run(pf + ["build", str(spec), "--root", str(root_b), "--runner", "processes", "--workers", "1"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    from test_flows import data_file_hashes

    a, b = data_file_hashes(root_a / "realsrc" / "v1"), data_file_hashes(root_b / "realsrc" / "v1")
    assert len(a) >= 3 * 200 and a == b

    from store import DatasetStore

    ds = DatasetStore(str(root_a)).load("realsrc@v1")
    assert len(ds) == 200
    item = ds[0]
    assert item["image"].ndim == 2 and item["label"].shape == item["image"].shape
    readme = (root_a / "realsrc" / "v1" / "README.md").read_text()
    assert "## Sources" in readme and "3 sources" in readme


# --------------------------------------------------------------------------------------------- surfaces
def test_surface_source_photos_get_defects_only_where_their_masks_allow_and_a_group_per_photo(tmp_path):
    import cv2
    import skimage.data as sd

    from flows.pipeline import make_samples
    from schemas.spec import spec_hash, validate_spec

    (tmp_path / "photos").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("brick", "gravel", "grass"):
        cv2.imwrite(str(tmp_path / "photos" / f"{name}.png"), getattr(sd, name)())
        m = np.zeros((512, 512), np.uint8)
        m[120:380, 150:420] = 255
        cv2.imwrite(str(tmp_path / "masks" / f"{name}.png"), m)
    data = {"name": "parts", "domain": "surface", "samples": 6, "seed": 4, "image": {"size": 512},
            "field_of_view_mm": 50, "source": {"path": str(tmp_path / "photos"), "masks": str(tmp_path / "masks")},
            "defects": {"negatives": 0, "mixture": ["3 mm stain", "8 mm scratch", "1 mm pit"]}}
    spec = validate_spec(data)
    assert spec.material == "image"
    samples = make_samples(spec, range(6))
    assert len({s.group for s in samples}) == 3 and all(s.group.startswith("src-") for s in samples)
    for s in samples:
        ys, xs = np.nonzero(s.instance)
        assert ys.size and ys.min() >= 120 and ys.max() < 380 and xs.min() >= 150 and xs.max() < 420
        assert s.qc["passed"]
    # The spec hash covers the photos' bytes: a changed photo is a different dataset.
    before = spec_hash(spec)
    cv2.imwrite(str(tmp_path / "photos" / "brick.png"), 255 - sd.brick())
    assert spec_hash(validate_spec(data)) != before


def test_volume_insertion_sizes_by_volume_equivalent_diameter_inside_the_lobe_off_vessels(phantom):
    from scipy import ndimage

    from generators.ct_insert3d import equivalent_diameter_mm, insert_nodule_3d
    from generators.ct_sources import estimate_noise, vessel_mask
    from schemas.classes import LOBES

    hu, lab = phantom_volume(seed=21, n_slices=8, levels=(0.6, 0.8))
    lobes = np.where(np.isin(lab, list(LOBES.values())), lab, 0)
    vessels = np.stack([vessel_mask(hu[k], lobes[k] > 0, PHANTOM_SPACING) for k in range(len(hu))])
    vessels |= np.isin(lab, [17, 18, 19])
    noise = estimate_noise(hu[4], (lobes[4] > 0) & ~vessels[4], PHANTOM_SPACING)
    done = 0
    for t in range(8):
        rng = np.random.default_rng(t)
        f = {"kind": ("solid", "ground_glass")[t % 2], "diameter_mm": float(rng.uniform(4, 10)),
             "margin": "lobulated", "location": "RLL"}
        region = lobes == LOBES["RLL"]
        label, inst = lab.copy(), np.zeros(hu.shape, np.uint16)
        try:
            vol, placed = insert_nodule_3d(hu, region, vessels, f, PHANTOM_SPACING, PHANTOM_SLICE_MM, noise, 0.5,
                                           rng, label, inst)
        except PlacementError:
            continue
        m = inst == 1
        assert abs(equivalent_diameter_mm(m, PHANTOM_SPACING, PHANTOM_SLICE_MM) - f["diameter_mm"]) <= 0.9
        shell = ndimage.distance_transform_edt(~m, sampling=(PHANTOM_SLICE_MM, PHANTOM_SPACING, PHANTOM_SPACING))
        assert region[(shell > 0) & (shell <= 2.0)].mean() >= 0.99 and not (vessels & m).any()
        assert m.any(axis=(1, 2)).sum() >= 2  # it spans slices
        # Through-plane partial volume (2.5 mm slices) lowers the edge voxels; the core reaches the lesion's HU.
        assert np.median(vol[m]) > np.median(hu[m]) + (300 if f["kind"] == "solid" else 80)
        done += 1
    assert done >= 4
