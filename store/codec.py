"""PNG encoding (the one path every PNG of the store goes through), pixel encodings and provenance chunks.

Which encoding an image gets is its domain's codec (``store.codecs``); the helpers below are what the built-in
codecs use.

CT images: lossless 16-bit PNG of HU + 1024, clipped to [0, 65535] (so -1024 HU is 0). Surface images: 8-bit
PNG, grey or RGB. Labels: 8-bit PNG of class ids; instance maps: 16-bit PNG. Compression level 1 (fixed, so
the bytes are a pure function of the pixels). Provenance JSON goes into an iTXt chunk named ``pairforge``.
"""
from __future__ import annotations

import hashlib
import json
import struct
import zlib
from typing import Any

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
    return np.clip(np.rint(np.asarray(hu, np.float64)) + HU_OFFSET, 0, 65535).astype(np.uint16)


def stored_to_hu(stored: np.ndarray) -> np.ndarray:
    return stored.astype(np.float32) - HU_OFFSET


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(array: np.ndarray, text: dict[str, Any] | None = None) -> bytes:
    """PNG bytes (level 1); RGB arrays are given in RGB order. ``text`` goes into one iTXt chunk as JSON."""
    a = array
    if a.ndim == 3:
        a = cv2.cvtColor(a, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", a, [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL])
    if not ok:
        raise RuntimeError(f"PNG encoding failed for an array of {array.dtype} {array.shape}")
    data = buf.tobytes()
    if text is not None:
        payload = json.dumps(text, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        itxt = _chunk(b"iTXt", ITXT_KEY + b"\x00\x00\x00" + b"\x00" + b"\x00" + payload)
        ihdr_end = 8 + 8 + 13 + 4
        data = data[:ihdr_end] + itxt + data[ihdr_end:]
    return data


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
    pos = 8
    while pos + 8 <= len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
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
        if kind == b"IDAT" or kind == b"IEND":
            if kind == b"IEND":
                break
        pos += 12 + n
    return None
