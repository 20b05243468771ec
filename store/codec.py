"""PNG encoding (the one path every PNG of the store goes through), pixel encodings and provenance chunks.

Which encoding an image gets is its domain's codec (``store.codecs``); the helpers below are what the built-in
codecs use.

CT images: lossless 16-bit PNG of HU + 1024, clipped to [0, 65535] (so -1024 HU is 0). Surface images: 8-bit
PNG, grey or RGB. Labels: 8-bit PNG of class ids; instance maps: 16-bit PNG. Standard PNG written here (libdeflate, compression level 1,
a fixed filter per kind of array; instance maps, mostly zeros, through the run-length coder ``deflate_runs``: the
bytes are a pure function of the pixels); read with any PNG decoder (OpenCV here). Provenance JSON goes into an
iTXt chunk named ``pairforge``.
"""
from __future__ import annotations

import hashlib
import json
import struct
import zlib
from typing import Any, Iterator

import cv2
import numpy as np

HU_OFFSET = 1024
PNG_LEVEL = 1
ITXT_KEY = b"pairforge"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"

CT_ENCODING = "uint16 png: HU + 1024, clipped to [0, 65535]"
U8_GREY_ENCODING = "uint8 png: grey"
U8_RGB_ENCODING = "uint8 png: RGB"
LABEL_ENCODING = "uint8 png: class id (never watermarked, never lossy)"
INSTANCE_ENCODING = "uint16 png: finding instance id (0 = none)"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hu_to_stored(hu: np.ndarray) -> np.ndarray:
    a = np.asarray(hu)
    if a.dtype == np.float32:
        # The same numbers as the float64 path below, at a third of its cost: rounding a float32 to an integer is
        # exact in float32, and adding the offset to an integer stays exact below 2^24 (larger values clip anyway).
        r = np.rint(a)
        r += np.float32(HU_OFFSET)
        return np.clip(r, 0, 65535, out=r).astype(np.uint16)
    return np.clip(np.rint(np.asarray(a, np.float64)) + HU_OFFSET, 0, 65535).astype(np.uint16)


def stored_to_hu(stored: np.ndarray) -> np.ndarray:
    return stored.astype(np.float32) - HU_OFFSET


def _chunk(kind: bytes, data: bytes) -> bytes:
    import deflate  # libdeflate's CRC-32: the same value as zlib's, several times faster, and no kind + data copy

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", deflate.crc32(data, deflate.crc32(kind)))


# Run-length deflate (``deflate_runs``): one fixed-Huffman block of literals and distance-1 matches, the tables below
# precomputed once. Deflate writes bits least significant first and Huffman codes most significant bit first, so each
# code is stored bit-reversed; a match's value is its length code, then its extra bits, then distance code 0 (5 zero
# bits: distance 1).
_LEN_BASE = (3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195,
             227, 258)
_LEN_EXTRA = (0,) * 8 + (1,) * 4 + (2,) * 4 + (3,) * 4 + (4,) * 4 + (5,) * 4 + (0,)
_RUN_TABLES: tuple[np.ndarray, ...] | None = None


def _reversed_bits(code: int, n: int) -> int:
    return int(format(code, f"0{n}b")[::-1], 2)


def _run_tables() -> tuple[np.ndarray, ...]:
    """(literal value, literal bits, match value, match bits) of the fixed Huffman code: literals by byte, matches of
    distance 1 by length (3-258)."""
    global _RUN_TABLES
    if _RUN_TABLES is None:
        lit_v, lit_n = np.zeros(256, np.uint64), np.zeros(256, np.uint64)
        for b in range(256):
            code, n = (0x30 + b, 8) if b < 144 else (0x190 + b - 144, 9)
            lit_v[b], lit_n[b] = _reversed_bits(code, n), n
        m_v, m_n = np.zeros(259, np.uint64), np.zeros(259, np.uint64)
        for length in range(3, 259):
            i = 28 if length == 258 else max(k for k in range(28) if _LEN_BASE[k] <= length)
            symbol = 257 + i
            code, n = (symbol - 256, 7) if symbol < 280 else (0xC0 + symbol - 280, 8)
            m_v[length] = _reversed_bits(code, n) | ((length - _LEN_BASE[i]) << n)
            m_n[length] = n + _LEN_EXTRA[i] + 5
        _RUN_TABLES = (lit_v, lit_n, m_v, m_n)
    return _RUN_TABLES


# Beyond this many runs per byte, run-length coding loses to libdeflate on size and speed: ``deflate_runs`` hands the
# data to libdeflate (a rule on the data alone, so the bytes stay a pure function of the pixels).
RUNS_MAX_FRACTION = 1 / 16


def deflate_runs(data: np.ndarray) -> bytes:
    """A zlib stream of ``data``'s bytes (C order) for data made of long runs of one byte value, e.g. a PNG's rows of a
    mostly-empty instance map: each run is a literal and distance-1 matches of up to 258 bytes, in
    one fixed-Huffman block, vectorised over runs (no per-byte work but finding where runs start). On such maps
    several times faster than libdeflate at level 1, for a few KB more. Standard zlib data (any inflater reads it);
    data with more than ``RUNS_MAX_FRACTION`` runs per byte goes to libdeflate at ``PNG_LEVEL`` instead."""
    import deflate

    s = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    size = s.size
    starts = np.flatnonzero(s[1:] != s[:-1])
    if size == 0 or starts.size > size * RUNS_MAX_FRACTION:
        return deflate.zlib_compress(s, PNG_LEVEL)
    starts += 1
    starts = np.concatenate(([0], starts))
    rest = np.diff(starts, append=size) - 1  # bytes of each run after its literal
    full, rem = np.divmod(rest, 258)
    count = 1 + full + np.where(rem >= 3, 1, rem)  # literal, full matches, then one match or 1-2 more literals
    run = np.repeat(np.arange(starts.size), count)
    k = np.arange(run.size) - np.repeat(np.cumsum(count) - count, count)  # token's place in its run
    full_r, rem_r = full[run], rem[run]
    is_match = (k >= 1) & ((k <= full_r) | ((k == full_r + 1) & (rem_r >= 3)))
    length = np.where(is_match, np.where(k <= full_r, 258, rem_r), 3)
    lit_v, lit_n, m_v, m_n = _run_tables()
    byte = s[starts][run]
    u64 = lambda *v: np.array(v, np.uint64)  # noqa: E731  (uint64 throughout: no detour through float64)
    value = np.concatenate((u64(3), np.where(is_match, m_v[length], lit_v[byte]), u64(0)))
    bits = np.concatenate((u64(3), np.where(is_match, m_n[length], lit_n[byte]), u64(7)))
    # value[0]: BFINAL 1 and BTYPE 01 (fixed Huffman); the last, end of block (7 zero bits). Pack LSB first into
    # little-endian 64-bit words: each token's bits are OR-ed into its word and the next (tokens never overlap).
    end = np.cumsum(bits)
    offset = end - bits
    word = (offset >> np.uint64(6)).astype(np.int64)
    shift = offset & np.uint64(63)
    group = np.concatenate(([0], np.flatnonzero(word[1:] != word[:-1]) + 1))
    words = np.zeros(int(end[-1]) // 64 + 2, np.uint64)
    words[word[group]] = np.bitwise_or.reduceat(value << shift, group)
    words[word[group] + 1] |= np.bitwise_or.reduceat((value >> np.uint64(1)) >> (np.uint64(63) - shift), group)
    body = words.astype("<u8", copy=False).tobytes()[:(int(end[-1]) + 7) // 8]
    return b"\x78\x01" + body + struct.pack(">I", deflate.adler32(s))


# PNG filter per row (the same one on every row: bytes stay a pure function of the pixels). "up" (2) suits images
# (neighbouring rows are alike); "none" (0) suits label and instance maps (long runs of one value).
PNG_FILTERS = {"none": 0, "sub": 1, "up": 2}
_COLOUR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type: grey, RGB, RGBA


def _filtered_rows(a: np.ndarray, kind: int) -> np.ndarray:
    """The image's scanlines, each preceded by its filter-type byte, as one (h, 1 + row bytes) uint8 array."""
    h = a.shape[0]
    be = a.astype(">u2", copy=False) if a.dtype == np.uint16 else np.ascontiguousarray(a)
    raw = be.reshape(h, -1).view(np.uint8)
    out = np.empty((h, raw.shape[1] + 1), np.uint8)
    out[:, 0] = kind
    body = out[:, 1:]
    if kind == 0:
        body[...] = raw
    elif kind == 1:
        bpp = a.itemsize * (a.shape[2] if a.ndim == 3 else 1)
        body[:, :bpp] = raw[:, :bpp]
        np.subtract(raw[:, bpp:], raw[:, :-bpp], out=body[:, bpp:])  # modulo 256
    else:
        body[0] = raw[0]
        np.subtract(raw[1:], raw[:-1], out=body[1:])  # modulo 256
    return out


def encode_png(array: np.ndarray, text: dict[str, Any] | None = None, png_filter: str = "up",
               palette: np.ndarray | None = None, transparent: int | None = None, runs: bool = False) -> bytes:
    """Standard PNG bytes: 8- or 16-bit grey, RGB or RGBA (given in RGB order), one filter on every row
    (``png_filter``: "up" for images, "none" for label maps), one IDAT compressed by libdeflate at ``PNG_LEVEL``.
    ``text`` goes into one iTXt chunk named ``pairforge`` as JSON, right after IHDR. Readers need nothing but a PNG
    decoder (OpenCV, Pillow, libpng); files written by the earlier zlib encoder read the same way.
    ``palette`` ((n <= 256) x 3 uint8 RGB): an indexed-colour PNG of the uint8 HxW ``array`` (a picture of a label
    map in class colours: a third of the RGB bytes to compress); readers decode it to those RGB colours.
    ``transparent`` (with ``palette``): the index whose pixels are fully transparent (a tRNS chunk), for a layer
    drawn over another image. A palette of at most 16 colours is written at 4 bits a pixel (two pixels a byte).
    ``runs``: compress with ``deflate_runs`` instead of libdeflate, for arrays that are mostly one value (instance
    maps): the same pixels, decoded by any reader, at a fraction of the CPU."""

    a = np.asarray(array)
    if palette is not None:
        pal = np.asarray(palette)
        if a.dtype != np.uint8 or a.ndim != 2 or pal.dtype != np.uint8 or pal.ndim != 2 or pal.shape[1] != 3 \
                or not 1 <= pal.shape[0] <= 256 or 0 in a.shape:
            raise ValueError(f"an indexed PNG takes a uint8 HxW array and an n x 3 uint8 palette (n <= 256), not "
                             f"{a.dtype} {a.shape} and {pal.dtype} {pal.shape}")
        if int(a.max()) >= pal.shape[0]:
            raise ValueError(f"pixel value {int(a.max())} has no palette entry ({pal.shape[0]} colours)")
        h, w = a.shape
        depth = 8
        if pal.shape[0] <= 16:  # two pixels a byte, the first in the high nibble (a zero nibble pads an odd row)
            depth = 4
            even = a if w % 2 == 0 else np.concatenate([a, np.zeros((h, 1), np.uint8)], axis=1)
            a = (even[:, 0::2] << 4) | even[:, 1::2]
        ihdr = struct.pack(">IIBBBBB", w, h, depth, 3, 0, 0, 0)
        parts = [_PNG_SIG, _chunk(b"IHDR", ihdr), _chunk(b"PLTE", pal.tobytes())]
        if transparent is not None:
            if not 0 <= int(transparent) < pal.shape[0]:
                raise ValueError(f"transparent index {transparent} is not in the palette (0 to {pal.shape[0] - 1})")
            parts.append(_chunk(b"tRNS", b"\xff" * int(transparent) + b"\x00"))  # later entries stay opaque
        return b"".join(parts + [_chunk(b"IDAT", _compress(_filtered_rows(a, PNG_FILTERS[png_filter]), runs)),
                                 _chunk(b"IEND", b"")])
    if transparent is not None:
        raise ValueError("a transparent index needs a palette (an indexed PNG)")
    if a.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"PNG stores uint8 or uint16 pixels, not {a.dtype} (array of shape {a.shape})")
    channels = a.shape[2] if a.ndim == 3 else 1
    if a.ndim not in (2, 3) or channels not in _COLOUR_TYPES or 0 in a.shape[:2]:
        raise ValueError(f"PNG stores HxW, HxWx3 or HxWx4 arrays, not {a.shape}")
    if png_filter not in PNG_FILTERS:
        raise ValueError(f"PNG filter {png_filter!r} is not known; accepted: {', '.join(PNG_FILTERS)}")
    h, w = a.shape[:2]
    ihdr = struct.pack(">IIBBBBB", w, h, 8 * a.itemsize, _COLOUR_TYPES[channels], 0, 0, 0)
    parts = [_PNG_SIG, _chunk(b"IHDR", ihdr)]
    if text is not None:
        payload = json.dumps(text, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        parts.append(_chunk(b"iTXt", ITXT_KEY + b"\x00\x00\x00" + b"\x00" + b"\x00" + payload))
    parts += [_chunk(b"IDAT", _compress(_filtered_rows(a, PNG_FILTERS[png_filter]), runs)), _chunk(b"IEND", b"")]
    return b"".join(parts)


def _compress(rows: np.ndarray, runs: bool) -> bytes:
    if runs:
        return deflate_runs(rows)
    import deflate

    return deflate.zlib_compress(rows, PNG_LEVEL)


def _walk_chunks(data: bytes) -> Iterator[tuple[bytes, bytes, bool]]:
    """(type, body, whole) of each chunk after the signature, up to IEND or the end of ``data``; ``whole`` is False
    for a chunk the data cuts short (its body then truncated)."""
    pos = 8
    while pos + 8 <= len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        yield kind, data[pos + 8:pos + 8 + n], pos + 12 + n <= len(data)
        if kind == b"IEND":
            return
        pos += 12 + n


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """A PNG's chunks in order, as (type, body); a ValueError for bytes that are not a whole PNG."""
    if not data.startswith(_PNG_SIG):
        raise ValueError("not a PNG")
    out = []
    for kind, body, whole in _walk_chunks(data):
        if not whole:
            break
        out.append((kind, body))
        if kind == b"IEND":
            return out
    raise ValueError("a PNG cut short (no IEND)")


def grey_png_as_indexed(data: bytes, palette: np.ndarray) -> bytes | None:
    """An 8-bit grey PNG (a label map's file) re-labelled as an indexed PNG with ``palette`` (n x 3 uint8 RGB): the
    same compressed scanlines (8-bit grey and 8-bit indexed rows are laid out and filtered alike), so nothing is
    compressed again. For a label written by ``encode_png(label, png_filter="none")`` the bytes equal
    ``encode_png(label, png_filter="none", palette=palette)``. None when ``data`` is not a non-interlaced 8-bit grey
    PNG (the caller encodes instead); pixel values must have palette entries (a 256-entry palette always does)."""
    try:
        chunks = png_chunks(data)
    except ValueError:
        return None
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        return None
    w, h, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    pal = np.asarray(palette)
    if (depth, colour, comp, filt, interlace) != (8, 0, 0, 0, 0) or pal.dtype != np.uint8 or pal.ndim != 2 \
            or pal.shape[1] != 3 or not 1 <= pal.shape[0] <= 256:
        return None
    idat = [_chunk(b"IDAT", body) for kind, body in chunks if kind == b"IDAT"]
    if not idat:
        return None
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0)
    return b"".join([_PNG_SIG, _chunk(b"IHDR", ihdr), _chunk(b"PLTE", pal.tobytes()), *idat, _chunk(b"IEND", b"")])


def decode_png(data: bytes) -> np.ndarray:
    """Any image bytes cv2 can read -> array (RGB order for colour), dtype kept."""
    a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if a is None:
        raise ValueError("not a readable image")
    if a.ndim == 3 and a.shape[2] == 3:
        a = cv2.cvtColor(a, cv2.COLOR_BGR2RGB)
    elif a.ndim == 3 and a.shape[2] == 4:
        a = cv2.cvtColor(a, cv2.COLOR_BGRA2RGB)
    return a


def read_itxt(data: bytes, key: bytes = ITXT_KEY) -> dict[str, Any] | None:
    """The pairforge iTXt JSON of a PNG, or None (not a PNG, no chunk)."""
    if not data.startswith(_PNG_SIG):
        return None
    for kind, body, _ in _walk_chunks(data):
        if kind == b"iTXt" and body.startswith(key + b"\x00"):
            rest = body[len(key) + 1:]
            compressed = rest[0] == 1
            rest = rest[2:]
            rest = rest[rest.index(b"\x00") + 1:]  # language tag
            rest = rest[rest.index(b"\x00") + 1:]  # translated keyword
            text = zlib.decompress(rest) if compressed else rest
            try:
                return json.loads(text.decode())
            except ValueError:
                return None
    return None
