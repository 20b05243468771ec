"""Image codecs: what a stored image's numbers mean, how they are stored losslessly, and how the watermark applies.

A domain declares its codec by name (``Domain.codec``, ``Domain.codec_params``). Every published sample records
its codec (Arrow column ``image_codec``: name, version, parameters) and the manifest records it too
(``codecs.image``); the loader decodes by that record, never by looking at pixels or at the domain name.

Built-in codecs:
- ``hu16`` v1: float Hounsfield units -> 16-bit PNG of HU + 1024 clipped to [0, 65535] (CT); watermark 14 HU;
- ``u8`` v1: 8-bit grey (HxW) or RGB (HxWx3) PNG as is; watermark 5 grey levels;
- ``float16`` v1: any float intensity -> 16-bit PNG of round((value - offset) / scale), clipped to [0, 65535];
  ``scale`` and ``offset`` are parameters recorded with every sample; watermark ``watermark_levels`` stored levels.

Versions published before codecs were recorded (no ``image_codec`` column; the manifest has only ``encodings``)
are read through ``LEGACY_ENCODINGS``, an explicit map from their encoding text to a codec.

Adding a codec (e.g. NIfTI volumes): subclass ``Codec``, set ``name``/``version``/``suffix``, implement
``encode``/``decode`` (and ``to_bytes``/``from_bytes`` for a file format other than PNG), decorate it with
``@register_codec``, and name it in the domain's description (``codec_module`` if it lives outside this module).
"""
from __future__ import annotations

import importlib
import json
from typing import Any, ClassVar

import numpy as np

from schemas.domain import get_domain
from store import codec as png
from store import watermark as wm
from store.errors import StoreError

_CODECS: dict[tuple[str, int], type["Codec"]] = {}


class Codec:
    """One way of storing images. Instances carry their parameters (recorded with every sample)."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    suffix: ClassVar[str] = ".png"
    params_accepted: ClassVar[tuple[str, ...]] = ()
    manifest_description: ClassVar[str] = ""
    watermark_levels: ClassVar[int | None] = None  # largest change of a stored value by the mark; None: no mark
    # decode() maps every stored value on its own (no neighbours, no image-wide statistics), so a table of the
    # decoded values of all 65,536 uint16 values gives the same numbers (the browser's views use one).
    pointwise: ClassVar[bool] = False

    def __init__(self, **params: Any):
        unknown = sorted(set(params) - set(self.params_accepted))
        if unknown:
            raise ValueError(f"codec {self.name!r} takes no parameter(s) {', '.join(unknown)}; accepted: "
                             f"{', '.join(self.params_accepted) or 'none'}")
        self.params = dict(params)

    # ---- pixels
    def encode(self, image: np.ndarray) -> np.ndarray:
        """A sample's image -> the array that is stored (before the watermark)."""
        raise NotImplementedError

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """The stored array -> the image as the domain means it (e.g. float32 HU)."""
        raise NotImplementedError

    def describe(self, stored: np.ndarray) -> str:
        """Human text for one stored image (the Arrow ``image_encoding`` column)."""
        return self.manifest_description

    def watermark(self, stored: np.ndarray, payload: wm.Payload, keep_out: np.ndarray | None) -> np.ndarray:
        """The stored array with the invisible mark added (findings in ``keep_out`` untouched)."""
        if self.watermark_levels is None:
            return stored
        return wm.embed(stored, payload, keep_out=keep_out, amplitude=self.watermark_levels)

    # ---- files
    def to_bytes(self, stored: np.ndarray, text: dict[str, Any] | None = None) -> bytes:
        return png.encode_png(stored, text=text)

    def from_bytes(self, data: bytes) -> np.ndarray:
        return png.decode_png(data)

    def read(self, data: bytes) -> np.ndarray:
        return self.decode(self.from_bytes(data))

    # ---- label and instance maps (stored in the image's format: PNG for 2D codecs, e.g. NIfTI for volumes)
    label_suffix: ClassVar[str] = ".png"
    label_encoding: ClassVar[str] = png.LABEL_ENCODING
    instance_encoding: ClassVar[str] = png.INSTANCE_ENCODING
    provenance_encoding: ClassVar[str] = "iTXt chunk 'pairforge' (JSON) in every image PNG"
    spatial_dims: ClassVar[int] = 2

    def sample_context(self, sample: Any) -> dict[str, Any]:
        """What this codec's files need from a sample beyond its pixels (e.g. a volume's affine); {} for PNG."""
        return {}

    def keep_out(self, instance: np.ndarray) -> np.ndarray | None:
        """Pixels the watermark must not touch (findings, dilated)."""
        return wm.keep_out_mask(instance)

    def label_to_bytes(self, label: np.ndarray, context: dict[str, Any] | None = None) -> bytes:
        return png.encode_png(np.asarray(label, dtype=np.uint8), png_filter="none")

    def instance_to_bytes(self, instance: np.ndarray, context: dict[str, Any] | None = None) -> bytes:
        # Mostly zeros: run-length deflate (store.codec.deflate_runs), ~2.5x less CPU for the whole PNG write than
        # libdeflate on these maps (bench/profile_sample.py).
        return png.encode_png(np.asarray(instance, dtype=np.uint16), png_filter="none", runs=True)

    def map_from_bytes(self, data: bytes) -> np.ndarray:
        """A stored label or instance map."""
        return png.decode_png(data)

    def read_meta(self, data: bytes) -> tuple[np.ndarray, dict[str, Any]]:
        """(stored array, metadata the file carries beyond pixels, e.g. {"affine": 4x4}); {} for PNG."""
        return self.from_bytes(data), {}

    def plane_shape(self, stored: np.ndarray) -> tuple[int, int, int]:
        """(height, width, channels) recorded in the index for one stored image."""
        return int(stored.shape[0]), int(stored.shape[1]), int(stored.shape[2]) if stored.ndim == 3 else 1

    # ---- the record
    def record(self) -> dict[str, Any]:
        return {"name": self.name, "version": int(self.version),
                "params_json": json.dumps(self.params, sort_keys=True, separators=(",", ":"))}

    def manifest_record(self) -> dict[str, Any]:
        return {"name": self.name, "version": int(self.version), "params": dict(self.params),
                "description": self.manifest_description}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}/{self.version}, {self.params})"


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Register a codec class under (name, version)."""
    if not cls.name:
        raise ValueError(f"codec class {cls.__name__} has no name")
    _CODECS[(cls.name, int(cls.version))] = cls
    return cls


def known_codecs() -> list[str]:
    return sorted(f"{n}/{v}" for n, v in _CODECS)


def get_codec(name: str, version: int | None = None, params: dict[str, Any] | None = None) -> Codec:
    """The codec ``name`` (newest version unless ``version``), built with ``params``."""
    versions = sorted(v for n, v in _CODECS if n == name)
    if not versions:  # a codec that lives in a domain's module (e.g. NIfTI volumes): import those modules, look again
        _load_domain_codecs()
        versions = sorted(v for n, v in _CODECS if n == name)
    if not versions:
        raise StoreError(f"image codec {name!r} is not known; known: {', '.join(known_codecs())}")
    v = versions[-1] if version is None else int(version)
    if (name, v) not in _CODECS:
        raise StoreError(f"image codec {name!r} version {v} is not known; known versions: "
                         f"{', '.join(map(str, versions))}")
    return _CODECS[(name, v)](**(params or {}))


def _load_domain_codecs() -> None:
    from schemas.domain import all_domains

    for d in all_domains():
        if d.codec_module:
            importlib.import_module(d.codec_module)


def codec_for_domain(domain: str) -> Codec:
    """The codec a domain's description declares (its module imported first if it names one)."""
    d = get_domain(domain)
    if d.codec_module:
        importlib.import_module(d.codec_module)
    return get_codec(d.codec, params=d.codec_params)


# ---------------------------------------------------------------- built-in codecs
@register_codec
class HU16(Codec):
    name, version = "hu16", 1
    manifest_description = png.CT_ENCODING
    pointwise = True
    watermark_levels = wm.CT_AMPLITUDE_HU

    def encode(self, image: np.ndarray) -> np.ndarray:
        if image.ndim != 2:
            raise ValueError(f"hu16 images must be HxW HU, not {image.shape}")
        return png.hu_to_stored(image)

    def decode(self, stored: np.ndarray) -> np.ndarray:
        return png.stored_to_hu(stored)


@register_codec
class U8(Codec):
    name, version = "u8", 1
    manifest_description = "uint8 png: grey or RGB"
    watermark_levels = wm.U8_AMPLITUDE

    def encode(self, image: np.ndarray) -> np.ndarray:
        if image.dtype != np.uint8:
            raise ValueError(f"u8 images must be uint8, not {image.dtype}")
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ValueError(f"8-bit images must be HxW or HxWx3, not {image.shape}")
        return image

    def decode(self, stored: np.ndarray) -> np.ndarray:
        return stored

    def describe(self, stored: np.ndarray) -> str:
        return png.U8_RGB_ENCODING if stored.ndim == 3 else png.U8_GREY_ENCODING


@register_codec
class Float16(Codec):
    """Arbitrary float intensities at a fixed resolution: value = stored * scale + offset."""

    name, version = "float16", 1
    params_accepted = ("scale", "offset", "watermark_levels")
    pointwise = True

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.scale = float(self.params.get("scale", 1.0))
        self.offset = float(self.params.get("offset", 0.0))
        if not self.scale > 0:
            raise ValueError(f"float16 scale must be positive, not {self.scale}")
        lv = self.params.get("watermark_levels", 4)
        self.watermark_levels = None if lv is None else int(lv)  # type: ignore[misc]

    @property
    def manifest_description(self) -> str:  # type: ignore[override]
        return f"uint16 png: value = stored * {self.scale:g} + {self.offset:g}, stored clipped to [0, 65535]"

    def encode(self, image: np.ndarray) -> np.ndarray:
        if image.ndim != 2:
            raise ValueError(f"float16 images must be HxW, not {image.shape}")
        q = np.rint((np.asarray(image, np.float64) - self.offset) / self.scale)
        return np.clip(q, 0, 65535).astype(np.uint16)

    def decode(self, stored: np.ndarray) -> np.ndarray:
        return (stored.astype(np.float64) * self.scale + self.offset).astype(np.float32)


# ---------------------------------------------------------------- reading what was published
# Versions published before codecs were recorded: their image_encoding text -> (codec, version). Explicit, so an
# encoding nobody mapped is an error rather than a guess.
LEGACY_ENCODINGS: dict[str, tuple[str, int]] = {
    png.CT_ENCODING: ("hu16", 1),
    png.U8_GREY_ENCODING: ("u8", 1),
    png.U8_RGB_ENCODING: ("u8", 1),
    "uint8 png: grey or RGB": ("u8", 1),
}


def codec_from_record(record: dict[str, Any] | None, encoding: str | None = None) -> Codec:
    """The codec a sample row records (``image_codec``), or, for rows published before that column existed, the
    one its ``image_encoding`` text maps to in ``LEGACY_ENCODINGS``."""
    if record:
        params = json.loads(record.get("params_json") or "{}")
        return get_codec(record["name"], record.get("version"), params)
    if encoding in LEGACY_ENCODINGS:
        name, version = LEGACY_ENCODINGS[encoding]
        return get_codec(name, version)
    raise StoreError(f"image encoding {encoding!r} is not known and the sample records no codec; known encodings: "
                     f"{'; '.join(LEGACY_ENCODINGS)}")


_ROW_CACHE: dict[tuple, Codec] = {}


def codec_for_row(row: dict[str, Any]) -> Codec:
    """``codec_from_record`` for an index row, cached (a version usually holds one codec)."""
    rec = row.get("image_codec")
    key = (rec["name"], rec.get("version"), rec.get("params_json")) if rec else ("legacy", row.get("image_encoding"))
    c = _ROW_CACHE.get(key)
    if c is None:
        c = _ROW_CACHE[key] = codec_from_record(rec, row.get("image_encoding"))
    return c
