"""The store's PNG writer (libdeflate): standard PNGs that OpenCV and Pillow decode bitwise, text chunks intact,
bytes a pure function of the pixels; files written by the earlier OpenCV/zlib encoder read and verify the same."""
from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from store import codec

REPO = Path(__file__).resolve().parents[1]
TEXT = {"dataset": "chest-ct", "sample_id": "s000001", "note": "ünïcode ✓", "index": 7}


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        out.append((kind, body))
        pos += 12 + n
    return out


def _arrays():
    rng = np.random.default_rng(2026)
    ct = np.clip(rng.normal(1024 - 850, 300, (64, 96)), 0, 65535).astype(np.uint16)
    ct[:8] = 65535  # extremes survive the byte order and the filter's modulo arithmetic
    ct[8:10] = 0
    label = np.zeros((64, 96), np.uint8)
    label[10:40, 20:70] = 12
    label[20:30, 30:40] = 19
    inst = np.zeros((64, 96), np.uint16)
    inst[20:30, 30:40] = 300  # above 255: both bytes of the 16-bit sample are used
    rgb = rng.integers(0, 256, (33, 17, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (1, 5), dtype=np.uint8)
    return {"ct16": ct, "label8": label, "instance16": inst, "rgb8": rgb, "grey8_one_row": grey}


@pytest.mark.parametrize("runs", [False, True])
@pytest.mark.parametrize("name", list(_arrays()))
@pytest.mark.parametrize("png_filter", sorted(codec.PNG_FILTERS))
def test_opencv_and_pillow_decode_every_written_png_bitwise(name, png_filter, runs):
    a = _arrays()[name]
    data = codec.encode_png(a, text=TEXT, png_filter=png_filter, runs=runs)
    back = codec.decode_png(data)  # OpenCV (RGB order restored)
    assert back.dtype == a.dtype and back.shape == a.shape and np.array_equal(back, a)
    im = Image.open(io.BytesIO(data))
    pil = np.array(im)
    assert pil.shape == a.shape and np.array_equal(pil.astype(a.dtype), a) and int(pil.max()) == int(a.max())
    assert json.loads(im.text["pairforge"]) == TEXT  # Pillow reads the iTXt chunk too
    assert codec.read_itxt(data) == TEXT


def test_png_structure_is_standard_and_text_sits_after_ihdr():
    a = _arrays()["ct16"]
    data = codec.encode_png(a, text=TEXT)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    kinds = [k for k, _ in _chunks(data)]
    assert kinds == [b"IHDR", b"iTXt", b"IDAT", b"IEND"]
    w, h, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", _chunks(data)[0][1])
    assert (w, h, depth, colour, comp, filt, interlace) == (96, 64, 16, 0, 0, 0, 0)
    raw = zlib.decompress(dict(_chunks(data))[b"IDAT"])  # plain zlib stream: any inflater reads it
    assert len(raw) == 64 * (1 + 96 * 2) and set(raw[:: 1 + 96 * 2]) == {2}  # filter "up" on every row
    labels = codec.encode_png(_arrays()["label8"], png_filter="none")
    raw = zlib.decompress(dict(_chunks(labels))[b"IDAT"])
    assert set(raw[:: 1 + 96]) == {0}
    assert [k for k, _ in _chunks(labels)] == [b"IHDR", b"IDAT", b"IEND"]


def test_bytes_are_a_pure_function_of_pixels_and_text():
    a = _arrays()["ct16"]
    one = codec.encode_png(a, text=TEXT)
    assert one == codec.encode_png(a.copy(), text=dict(reversed(list(TEXT.items()))))
    assert one != codec.encode_png(a, text={**TEXT, "index": 8})
    b = a.copy()
    b[5, 5] ^= 1
    assert codec.encode_png(b, text=TEXT) != one
    # A non-contiguous view encodes like its contiguous copy.
    big = np.zeros((64, 192), np.uint16)
    big[:, ::2] = a
    assert codec.encode_png(big[:, ::2], text=TEXT) == one


def test_libdeflate_is_faster_than_opencv_zlib_at_similar_size_on_a_ct_slice():
    import time

    from flows.pipeline import make_samples
    from schemas.spec import load_spec_text

    text = (REPO / "examples" / "chest_ct_nodules.yaml").read_text().replace("samples: 1000", "samples: 2")
    s = make_samples(load_spec_text(text), [0])[0]
    stored = codec.hu_to_stored(s.image)
    reps = 5

    def cpu(f):
        t = time.process_time()
        for _ in range(reps):
            out = f()
        return (time.process_time() - t) / reps, len(out)

    t_new, n_new = cpu(lambda: codec.encode_png(stored))
    t_old, n_old = cpu(lambda: cv2.imencode(".png", stored, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes())
    assert np.array_equal(codec.decode_png(codec.encode_png(stored)), stored)
    assert n_new < 1.05 * n_old  # within 5 % of OpenCV's level-1 size
    assert t_new < 0.7 * t_old, (t_new, t_old)  # measured ~3x faster; a loose bound for a busy machine


@pytest.mark.parametrize("length", [1, 2, 3, 4, 10, 11, 257, 258, 259, 260, 261, 262, 516, 517, 518, 519, 520, 775])
def test_run_length_deflate_is_zlib_data_for_every_run_length(length):
    # a run's literal, then matches of 258 and a last one of 3-257 or one or two literals: every branch, both ends
    for before, after in ((b"", b""), (b"\x07", b"\x09"), (b"\xff" * 300, b"\x00")):
        raw = np.frombuffer(before + b"\x05" * length + after, np.uint8)
        out = codec.deflate_runs(raw)
        assert out[:2] == b"\x78\x01" and zlib.decompress(out) == raw.tobytes()
        assert struct.unpack(">I", out[-4:])[0] == zlib.adler32(raw.tobytes())


def test_run_length_deflate_round_trips_random_runs_and_hands_busy_data_to_libdeflate():
    import deflate

    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(1, 400))
        raw = np.repeat(rng.integers(0, 256, n).astype(np.uint8), rng.integers(1, 900, n))
        out = codec.deflate_runs(raw)
        assert zlib.decompress(out) == raw.tobytes()
        assert codec.deflate_runs(raw) == out  # a pure function of the bytes
    noise = rng.integers(0, 256, 5000, dtype=np.uint8)  # one run per byte: libdeflate's bytes, not the run coder's
    assert codec.deflate_runs(noise) == deflate.zlib_compress(noise, codec.PNG_LEVEL)
    assert zlib.decompress(codec.deflate_runs(np.zeros(0, np.uint8))) == b""
    inst = np.zeros((512, 512), np.uint16)  # a mostly-empty instance map: a few KB
    inst[100:140, 200:260] = 3
    assert len(codec.encode_png(inst, png_filter="none", runs=True)) < 10_000


def test_instance_maps_are_written_by_the_run_length_coder_and_decode_to_the_same_array():
    from store.codecs import codec_for_domain

    inst = _arrays()["instance16"]
    data = codec_for_domain("chest_ct").instance_to_bytes(inst)
    idat = b"".join(body for kind, body in _chunks(data) if kind == b"IDAT")
    assert idat == codec.deflate_runs(codec._filtered_rows(inst, codec.PNG_FILTERS["none"]))
    assert np.array_equal(codec.decode_png(data), inst) and codec.decode_png(data).dtype == np.uint16


def test_bad_arrays_are_one_line_errors():
    with pytest.raises(ValueError, match="uint8 or uint16"):
        codec.encode_png(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="HxW, HxWx3 or HxWx4"):
        codec.encode_png(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="accepted: none, sub, up"):
        codec.encode_png(np.zeros((4, 4), np.uint8), png_filter="paeth")


def test_versions_written_by_the_zlib_encoder_still_read_and_verify(tmp_path):
    """tests/fixtures/v1 was published with OpenCV/zlib PNGs: hash checks and reads do not depend on the encoder,
    and its pixels written again by this encoder decode to the same arrays."""
    from store import DatasetStore

    root = tmp_path / "root"
    shutil.copytree(REPO / "tests" / "fixtures" / "v1", root)
    expected = json.loads((REPO / "tests" / "fixtures" / "v1_expected.json").read_text())
    st = DatasetStore(str(root))
    for ref in expected:
        report = st.verify_version(ref)
        assert report.ok and report.files_checked == 14, str(report)
        index = st.index(ref)
        name, v = ref.split("@")
        for col in ("image_path", "label_path", "instance_path"):
            data = (root / name / v / index.column(col)[0].as_py()).read_bytes()
            old = codec.decode_png(data)
            again = codec.decode_png(codec.encode_png(old, png_filter="up" if col == "image_path" else "none"))
            assert again.dtype == old.dtype and np.array_equal(again, old)
            if col == "image_path":
                assert codec.read_itxt(data)["sample_id"] == index.column("sample_id")[0].as_py()
        assert len(list(st.load(ref))) == len(expected[ref])


def test_indexed_png_decodes_to_its_palette_colours_in_opencv_and_pillow():
    rng = np.random.default_rng(5)
    label = rng.integers(0, 7, (40, 56)).astype(np.uint8)
    label[10:30, 5:50] = 3  # runs, as in a label map
    palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
    data = codec.encode_png(label, png_filter="none", palette=palette)
    kinds = [k for k, _ in _chunks(data)]
    assert kinds == [b"IHDR", b"PLTE", b"IDAT", b"IEND"]
    assert _chunks(data)[0][1][8:10] == bytes([8, 3])  # 8-bit, colour type 3 (indexed)
    want = palette[label]
    assert np.array_equal(codec.decode_png(data), want)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), want)
    idat = lambda d: len(next(b for k, b in _chunks(d) if k == b"IDAT"))  # noqa: E731
    assert idat(data) < idat(codec.encode_png(want, png_filter="none"))  # one byte per pixel instead of three
    with pytest.raises(ValueError, match="no palette entry"):
        codec.encode_png(np.full((4, 4), 9, np.uint8), palette=palette[:5])
    with pytest.raises(ValueError, match="indexed PNG takes a uint8 HxW array"):
        codec.encode_png(np.zeros((4, 4), np.uint16), palette=palette)


def test_indexed_png_with_a_transparent_index_decodes_with_alpha_in_opencv_and_pillow():
    """The browser's outline layer: index 0 fully transparent (tRNS), every other index opaque."""
    rng = np.random.default_rng(6)
    layer = np.zeros((30, 44), np.uint8)
    layer[5, 3:40] = 7
    layer[20:25, 10] = 255
    palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
    data = codec.encode_png(layer, png_filter="none", palette=palette, transparent=0)
    assert [k for k, _ in _chunks(data)] == [b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"]
    rgba = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))
    assert np.array_equal(rgba[..., 3], np.where(layer > 0, 255, 0))
    assert np.array_equal(rgba[..., :3][layer > 0], palette[layer[layer > 0]])
    bgra = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(bgra[..., 3], rgba[..., 3]) and np.array_equal(bgra[..., 2::-1][layer > 0],
                                                                         rgba[..., :3][layer > 0])
    with pytest.raises(ValueError, match="transparent index 300 is not in the palette"):
        codec.encode_png(layer, palette=palette, transparent=300)
    with pytest.raises(ValueError, match="a transparent index needs a palette"):
        codec.encode_png(layer, transparent=0)


def test_hu_to_stored_gives_the_same_numbers_for_float32_as_the_float64_rounding():
    """The float32 path (what the renderers give) rounds in float32; the stored values are those of rounding in
    float64, halves, the clip range and infinities included."""
    ref = lambda hu: np.clip(np.rint(np.asarray(hu, np.float64)) + codec.HU_OFFSET, 0, 65535).astype(np.uint16)  # noqa: E731
    rng = np.random.default_rng(0)
    for scale in (1, 100, 3000, 1e5, 1e9):
        a = (rng.standard_normal(200_000) * scale).astype(np.float32)
        a[:1000] = np.round(a[:1000]) + 0.5
        assert np.array_equal(codec.hu_to_stored(a), ref(a))
    edges = np.concatenate([np.arange(-2000, 66000, 0.25, dtype=np.float32),
                            np.array([np.inf, -np.inf, 3.4e38, -3.4e38, -1024.5, 64511.5], np.float32)])
    assert np.array_equal(codec.hu_to_stored(edges), ref(edges))
    assert np.array_equal(codec.hu_to_stored(edges.astype(np.float64)), ref(edges))


def test_a_grey_label_png_relabelled_as_indexed_equals_encoding_it_with_the_palette():
    """The browser's label picture reuses the published label's compressed rows: the same bytes as encoding the
    label again with the palette; anything but a non-interlaced 8-bit grey PNG is declined (None)."""
    rng = np.random.default_rng(8)
    label = rng.integers(0, 20, (37, 51)).astype(np.uint8)
    label[5:30, 4:40] = 12
    palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
    grey = codec.encode_png(label, png_filter="none")
    assert codec.grey_png_as_indexed(grey, palette) == codec.encode_png(label, png_filter="none", palette=palette)
    ok, cv_grey = cv2.imencode(".png", label)  # another encoder's grey PNG: still the same pixels in colour
    assert np.array_equal(codec.decode_png(codec.grey_png_as_indexed(cv_grey.tobytes(), palette)), palette[label])
    assert codec.grey_png_as_indexed(codec.encode_png(label.astype(np.uint16)), palette) is None  # 16-bit
    assert codec.grey_png_as_indexed(codec.encode_png(np.dstack([label] * 3)), palette) is None  # RGB
    assert codec.grey_png_as_indexed(grey[:-20], palette) is None  # cut short
    assert codec.grey_png_as_indexed(b"not a png", palette) is None


@pytest.mark.parametrize("width", [40, 41])
def test_a_palette_of_sixteen_colours_or_fewer_packs_two_pixels_a_byte(width):
    rng = np.random.default_rng(width)
    layer = rng.integers(0, 7, (23, width)).astype(np.uint8)
    palette = rng.integers(0, 256, (7, 3)).astype(np.uint8)
    data = codec.encode_png(layer, png_filter="none", palette=palette, transparent=0)
    assert _chunks(data)[0][1][8:10] == bytes([4, 3])  # 4-bit, indexed
    rgba = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))
    assert np.array_equal(rgba[..., :3], palette[layer]) and np.array_equal(rgba[..., 3], np.where(layer > 0, 255, 0))
    bgra = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(bgra[..., 2::-1], palette[layer])
