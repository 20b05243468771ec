"""Watermark v3 under geometry: 8-bit lung-window copies of real chest-CT samples decode after a rescale by a factor
no list contains, a rotation, a crop plus JPEG; unmarked images are rejected by the sync threshold and the keyed
check; scheme-v2 and scheme-v1 images still decode; ``verify`` reads a NIfTI volume."""
from __future__ import annotations

import numpy as np
import pytest
import cv2

from flows.pipeline import make_samples
from schemas.spec import load_spec_text
from store import codec
from store import watermark as wm
from store import watermark_v1 as v1
from store import watermark_v2 as v2

CT = load_spec_text("name: wm-sync\nsamples: 1000\nfindings: {negatives: 0.2, mixture: "
                    "['6-12 mm solid nodule, any lobe', '10-20 mm ground-glass nodule, any lobe']}")


@pytest.fixture(scope="module")
def marked():
    """(stored host, marked, payload) for two 512x512 chest-CT samples."""
    out = []
    for s in make_samples(CT, range(40, 42)):
        host = codec.hu_to_stored(s.image)
        p = wm.payload_for("wm-sync", 3, s.index)
        out.append((host, wm.embed(host, p, wm.keep_out_mask(s.instance)), p))
    return out


def lung_window(u16):
    hu = u16.astype(np.float32) - codec.HU_OFFSET
    return np.clip(np.rint((hu + 1350) / 1500 * 255), 0, 255).astype(np.uint8)


def jpeg(u8, q):
    ok, buf = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, q])
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)


def resize(a, s):
    h, w = a.shape[:2]
    return cv2.resize(a, (int(round(w * s)), int(round(h * s))),
                      interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)


def rotate(a, deg):
    h, w = a.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), deg, 1.0)
    return cv2.warpAffine(a, m, (w, h), flags=cv2.INTER_LINEAR)


def test_lung_window_copy_decodes_after_a_rescale_by_a_random_factor_no_list_holds(marked):
    rng = np.random.default_rng(2026)
    for host, m, p in marked:
        s = float(rng.uniform(0.55, 1.9))
        while min(abs(s - f) for f in v1.SCALES) < 0.05:  # never one of the old scheme's listed factors
            s = float(rng.uniform(0.55, 1.9))
        det = wm.decode(resize(lung_window(m), s))
        assert det.found and det.payload == p and det.scheme == wm.VERSION == 3, (s, det.sync_score, det.template_score)
        assert abs(det.scale / s - 1) < 0.01 and abs(det.rotation) < 0.3


@pytest.mark.parametrize("deg", [3.5, -4.6])
def test_lung_window_copy_decodes_after_a_rotation(marked, deg):
    host, m, p = marked[0]
    det = wm.decode(rotate(lung_window(m), deg))
    assert det.found and det.payload == p, (det.sync_score, det.template_score, det.rotation)
    assert abs(det.rotation - deg) < 0.3 and abs(det.scale - 1) < 0.01


def test_lung_window_copy_decodes_after_a_crop_to_half_the_area_and_jpeg_80(marked):
    for host, m, p in marked:
        a = lung_window(m)
        c = int(round(512 * np.sqrt(0.5)))
        det = wm.decode(jpeg(a[77:77 + c, 31:31 + c], 80))
        assert det.found and det.payload == p, (det.sync_score, det.template_score)


def test_unmarked_images_and_copies_are_rejected(marked):
    rng = np.random.default_rng(5)
    noise = cv2.GaussianBlur(rng.normal(128, 40, (384, 384)).astype(np.float32), (0, 0), 1.2)
    for a in (marked[0][0], lung_window(marked[1][0]), rotate(resize(lung_window(marked[0][0]), 0.7), 2.0),
              np.clip(noise, 0, 255).astype(np.uint8)):
        det = wm.decode(a)
        assert not det.found and det.payload is None and det.attempts >= 1


def test_acceptance_needs_both_the_sync_threshold_and_the_keyed_check(marked):
    host, m, p = marked[0]
    f = wm._fold(wm._residual(lung_window(m).astype(np.float32)))
    ok, pbits, score, shift, _ = wm.read_folded(f)
    assert ok[0] and score[0] >= wm.SYNC_THRESHOLD and np.array_equal(pbits[0], wm.payload_bits(p))
    assert wm.accepted(True, float(score[0])) and not wm.accepted(False, float(score[0]))
    assert not wm.accepted(True, wm.SYNC_THRESHOLD - 0.01)
    # the check is a keyed 32-bit function of the payload: one flipped payload bit changes it
    bits = wm.payload_bits(p)
    flipped = bits.copy()
    flipped[17] ^= 1
    assert not np.array_equal(wm.check_bits(bits), wm.check_bits(flipped))
    # pure-noise folded tiles: the pilot correlation stays under the threshold and no check passes
    rng = np.random.default_rng(11)
    ok, _, score, _, _ = wm.read_folded(rng.standard_normal((400, wm.TILE, wm.TILE)).astype(np.float32))
    assert not ok.any() and score.max() < wm.SYNC_THRESHOLD
    # the analytic bound: reads x 2 keyed checks (v3 and v2) x 2^-32
    assert wm.false_accept_bound(12) == pytest.approx(12 * 2 / 2 ** 32)


def test_scheme_v2_images_still_decode_after_a_rescale(marked):
    host, _, p = marked[0]
    old = v2.embed(host, p)
    for a in (lung_window(old), resize(lung_window(old), 0.8)):
        det = wm.decode(a)
        assert det.found and det.payload == p and det.scheme == 2 and det.sync_score >= wm.SYNC_THRESHOLD


def test_scheme_v1_images_still_decode(marked):
    host, _, p = marked[1]
    old = v1.embed(host, p)
    det = wm.decode(lung_window(old))
    assert det.found and det.payload == p and det.scheme == 1 and det.sync_score >= wm.SYNC_THRESHOLD_V1


def test_verify_reads_the_payload_of_a_single_nifti_volume(tmp_path):
    import store
    import store.nifti  # noqa: F401  (registers the codec)
    from store.codecs import get_codec

    samples = make_samples(load_spec_text("name: wm-vol\nsamples: 10\nimage: {size: 256}\nfindings: "
                                          "{negatives: 1.0, mixture: ['6-12 mm solid nodule, any lobe']}"), range(3))
    vol = np.stack([s.image for s in samples]).astype(np.float32)
    nifti = get_codec("nifti_hu16")
    p = wm.payload_for("wm-vol", 2, 7)
    data = nifti.to_bytes(nifti.watermark(nifti.encode(vol), p, None), {"affine_ras": np.eye(4).tolist()})
    path = tmp_path / "copy.nii.gz"
    path.write_bytes(data)
    res = store.verify_image(str(path))
    assert res.identified and res.payload == p.hex and res.version == 2 and res.index == 7
    assert any("3 of 3 slices" in n for n in res.notes)
    from typer.testing import CliRunner

    from flows.cli import app

    out = CliRunner().invoke(app, ["verify", str(path), "--json"])
    assert out.exit_code == 0 and p.hex in out.output
    unmarked = tmp_path / "plain.nii.gz"
    unmarked.write_bytes(nifti.to_bytes(nifti.encode(vol), {"affine_ras": np.eye(4).tolist()}))
    assert CliRunner().invoke(app, ["verify", str(unmarked)]).exit_code == 1


# ------------------------------------------------------------------ 256 px images (scheme v3)
SMALL = load_spec_text("name: wm-small\nsamples: 1000\nseed: 3\nimage: {size: 256, spacing_mm: [1.2, 1.4]}\n"
                       "findings: {negatives: 0.2, mixture: ['8mm solid nodule, right upper lobe', "
                       "'12 mm GGN in the RLL']}")


@pytest.fixture(scope="module")
def small_marked():
    """(marked stored image, payload) for eight 256x256 chest-CT samples at 1.2-1.4 mm (the test suite's tiny-spec
    texture, where scheme v2 missed some unattacked images)."""
    out = []
    for s in make_samples(SMALL, range(8)):
        p = wm.payload_for("wm-small", 2, s.index)
        out.append((wm.embed(codec.hu_to_stored(s.image), p, wm.keep_out_mask(s.instance)), p))
    return out


def test_every_unattacked_256_px_ct_image_is_traced_in_16_bits_and_in_the_lung_window(small_marked):
    for m, p in small_marked:
        for a in (m, lung_window(m)):
            det = wm.decode(a)
            assert det.found and det.payload == p and det.scheme == 3, (p.index, det.sync_score)
            assert det.sync_score >= 10.0  # measured 14-19 sd on these (threshold 6)


def test_256_px_lung_window_copies_decode_after_a_strong_downscale_or_a_small_rotation(small_marked):
    # the template alone misses many of these on 256 px copies; the pilot-screened search finds them (measured 12/12
    # on the bench's 12-image set for each attack; required here: every one of the first four)
    for m, p in small_marked[:4]:
        for a in (resize(lung_window(m), 0.55), rotate(lung_window(m), -1.0)):
            det = wm.decode(a)
            assert det.found and det.payload == p, (p.index, det.sync_score, det.scale, det.rotation)
