"""PNG encoding (the one path every PNG of the store goes through), pixel encodings and provenance chunks.

Which encoding an image gets is its domain's codec (``store.codecs``); the helpers below are what the built-in
codecs use.

CT images: lossless 16-bit PNG of HU + 1024, clipped to [0, 65535] (so -1024 HU is 0). Surface images: 8-bit
PNG, grey or RGB. Labels: 8-bit PNG of class ids; instance maps: 16-bit PNG. Standard PNG written here (libdeflate, compression level 1,
a fixed filter per kind of array: the bytes are a pure function of the pixels); read with any PNG decoder
(OpenCV here). Provenance JSON goes into an iTXt chunk named ``pairforge``.
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
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


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
               palette: np.ndarray | None = None, transparent: int | None = None) -> bytes:
    """Standard PNG bytes: 8- or 16-bit grey, RGB or RGBA (given in RGB order), one filter on every row
    (``png_filter``: "up" for images, "none" for label maps), one IDAT compressed by libdeflate at ``PNG_LEVEL``.
    ``text`` goes into one iTXt chunk named ``pairforge`` as JSON, right after IHDR. Readers need nothing but a PNG
    decoder (OpenCV, Pillow, libpng); files written by the earlier zlib encoder read the same way.
    ``palette`` ((n <= 256) x 3 uint8 RGB): an indexed-colour PNG of the uint8 HxW ``array`` (a picture of a label
    map in class colours: a third of the RGB bytes to compress); readers decode it to those RGB colours.
    ``transparent`` (with ``palette``): the index whose pixels are fully transparent (a tRNS chunk), for a layer
    drawn over another image. A palette of at most 16 colours is written at 4 bits a pixel (two pixels a byte)."""
    import deflate

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
        return b"".join(parts + [_chunk(b"IDAT", deflate.zlib_compress(_filtered_rows(a, PNG_FILTERS[png_filter]),
                                                                           PNG_LEVEL)), _chunk(b"IEND", b"")])
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
    parts += [_chunk(b"IDAT", deflate.zlib_compress(_filtered_rows(a, PNG_FILTERS[png_filter]), PNG_LEVEL)),
              _chunk(b"IEND", b"")]
    return b"".join(parts)


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
