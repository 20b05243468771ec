"""The invisible watermark (scheme v3): payload, keyed check and ECC, distortion bounds, findings left untouched,
recovery after the attacks users apply (8-bit lung window, JPEG, 0.5x downscale, 10 % crop), no false positives,
speed and determinism. Uses real chest-CT and surface samples from the pipeline. Geometric attacks (any scale,
rotation, crop + JPEG), the acceptance rule and scheme-v1 compatibility: tests/test_watermark_sync.py."""
from __future__ import annotations

import hashlib
import time

import cv2
import numpy as np
import pytest

from flows.pipeline import make_samples
from schemas.spec import load_spec_text
from store import codec
from store import watermark as wm
from store import watermark_v1 as v1
from store import watermark_v2 as v2

CT = load_spec_text("name: wm-ct\nsamples: 1000\nfindings: {negatives: 0.1, mixture: "
                    "['6-12 mm solid nodule, any lobe', '10-20 mm ground-glass nodule, RLL']}")
SURFACE_TEXT = ("domain: surface\nname: wm-surface\nsamples: 100\nimage: {size: 512, color: rgb}\n"
                         "defects: {negatives: 0, mixture: ['2-4 mm scratch on brushed aluminium']}")


@pytest.fixture(scope="module")
def ct_samples():
    return make_samples(CT, range(200, 206))


def lung_window(u16):
    hu = u16.astype(np.float32) - 1024
    return np.clip(np.rint((hu + 1350) / 1500 * 255), 0, 255).astype(np.uint8)


def jpeg75(u8):
    ok, buf = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, 75])
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)


def half(a):
    return cv2.resize(a, (a.shape[1] // 2, a.shape[0] // 2), interpolation=cv2.INTER_AREA)


def test_payload_packs_dataset_version_and_index_into_64_bits():
    p = wm.payload_for("chest-ct-nodules", 42, 9_999_999)
    assert p.dataset_id == int(hashlib.sha256(b"chest-ct-nodules").hexdigest()[:6], 16)
    assert wm.Payload.from_hex(p.hex) == p and len(p.hex) == 16 and wm.PAYLOAD_BITS == 64
    with pytest.raises(ValueError, match="version < 65536"):
        wm.payload_for("x", 70_000, 1)


def test_convolutional_code_corrects_scattered_bit_errors():
    info = np.frombuffer(hashlib.sha256(b"bits").digest(), np.uint8)[:12]
    bits = np.unpackbits(info)  # 96 information bits: 64 payload + 32 check
    coded = wm.conv_encode(bits)
    assert len(coded) == wm.CODED_BITS == 204
    soft = 1.0 - 2.0 * coded
    soft[[3, 30, 57, 84, 111, 138, 165, 192]] *= -1  # 8 hard errors, spread out
    assert np.array_equal(wm.viterbi_decode(soft), bits)
    assert np.array_equal(wm.viterbi_batch(np.stack([soft, soft]))[1], bits)


def test_ct_mark_changes_no_pixel_by_more_than_14_hu_and_never_touches_findings(ct_samples):
    for s in ct_samples:
        host = codec.hu_to_stored(s.image)
        marked = wm.embed(host, wm.payload_for("wm-ct", 1, s.index), wm.keep_out_mask(s.instance))
        diff = np.abs(marked.astype(np.int32) - host.astype(np.int32))
        assert diff.max() == wm.CT_AMPLITUDE_HU == 14
        if s.instance.any():
            assert diff[s.instance > 0].max() == 0
            assert diff[wm.keep_out_mask(s.instance)].max() == 0  # margin included


def test_8bit_mark_keeps_psnr_above_37_5_db_on_grey_and_rgb():
    samples = make_samples(load_spec_text(SURFACE_TEXT), range(2))
    for s in samples:
        for img in (s.image, cv2.cvtColor(s.image, cv2.COLOR_RGB2GRAY)):
            marked = wm.embed(img, wm.payload_for("wm-surface", 1, s.index), wm.keep_out_mask(s.instance))
            diff = marked.astype(np.float64) - img
            assert np.abs(diff).max() <= wm.U8_AMPLITUDE == 5
            psnr = 10 * np.log10(255 ** 2 / np.mean(diff ** 2))
            assert psnr >= 37.5  # scheme v3: cells 3 + template 3 grey levels, clipped to 5 (v2: 2 + 3, 40.9 dB)
            assert wm.decode(jpeg75(marked if marked.ndim == 2 else cv2.cvtColor(marked, cv2.COLOR_RGB2BGR))).payload \
                == wm.payload_for("wm-surface", 1, s.index)


ATTACKS = {
    "16-bit": lambda a: a,
    "lung window 8-bit": lung_window,
    "lung window + JPEG 75": lambda a: jpeg75(lung_window(a)),
    "downscale 0.5": half,
    "crop 10 %": lambda a: a[23:23 + 461, 41:41 + 461],
    "window + JPEG 75 + downscale + crop": lambda a: half(jpeg75(lung_window(a)))[7:7 + 230, 19:19 + 230],
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_exact_payload_survives_attack(attack, ct_samples):
    traced = 0
    for s in ct_samples:
        payload = wm.payload_for("wm-ct", 7, s.index)
        marked = wm.embed(codec.hu_to_stored(s.image), payload, wm.keep_out_mask(s.instance))
        det = wm.decode(ATTACKS[attack](marked))
        assert det.payload in (None, payload)  # never a wrong payload
        if det.found:
            traced += 1
            assert (abs(det.scale - 0.5) < 0.01) == ("downscale" in attack), det.scale
    # the combined attack leaves a 230-px JPEG'd copy: the blind scale search (no listed factors) and the payload
    # read succeed on 4 of these 6 (measured; docs/watermark.md has the rates); every other attack: all 6
    assert traced >= (4 if "crop" in attack and "downscale" in attack else len(ct_samples)), (attack, traced)


def test_unmarked_images_are_not_reported_as_marked(ct_samples):
    for s in ct_samples:
        host = codec.hu_to_stored(s.image)
        for a in (host, jpeg75(lung_window(host))):
            det = wm.decode(a)
            assert not det.found and det.payload is None


def test_encode_takes_under_10_ms_per_512_image_on_one_core(ct_samples):
    cv2.setNumThreads(1)
    s = ct_samples[0]
    host = codec.hu_to_stored(s.image)
    times = []
    for k in range(15):
        t0 = time.perf_counter()
        wm.embed(host, wm.payload_for("wm-ct", 1, k), wm.keep_out_mask(s.instance))
        times.append(time.perf_counter() - t0)
    assert float(np.median(times)) * 1e3 < 10.0


def test_pattern_is_a_fixed_function_of_the_key_and_uses_no_global_random_state(ct_samples):
    state = np.random.get_state()[1].copy()
    p = wm.Payload(0xABCDEF, 3, 12345)
    assert p.hex == "abcdef0003003039"
    # Pinned: changing the key or the layout would make every published mark unreadable.
    assert hashlib.sha256(wm.tile_delta(p, 14).astype(np.int8).tobytes()).hexdigest() == \
        "693c82c67ebf34fbca43407ffab38ab014a2e1938c9d28e0112468824b1b4a56"
    # schemes v2 and v1 (older versions) stay readable: their patterns are pinned too
    assert hashlib.sha256(v2.tile_delta(p, 14).astype(np.int8).tobytes()).hexdigest() == \
        "00239f4974c7a9c22e1cd1c53292c4a855da04da6186774130d9662df0b38f9f"
    assert hashlib.sha256(v1.tile_pattern(p).astype(np.int8).tobytes()).hexdigest() == \
        "e0aeb3df64a70401e8c8c3a6ad33addf6cf857c624b190ea2d6cb5fa7a7cdcc5"
    wm.decode(wm.embed(codec.hu_to_stored(ct_samples[0].image), p))
    assert np.array_equal(np.random.get_state()[1], state)


def test_embed_rejects_float_images_with_a_clear_message():
    with pytest.raises(ValueError, match="uint16 .* or uint8"):
        wm.embed(np.zeros((64, 64), np.float32), wm.Payload(1, 1, 1))
