"""The Arrow schema of a version's Parquet index (``samples.parquet``): one row per sample. Defined once, here.

Findings of every domain share one struct: nullable common fields (CT nodules and surface defects fill the
ones they have) plus ``extra``, a JSON string holding any other key. ``finding_row`` / ``finding_dict`` convert
between a sample's finding dicts and that struct. Drawn parameters and QC history are JSON strings (sorted keys)
so that the bytes of the file are a pure function of the data.
"""
from __future__ import annotations

import json
import math
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = "2"  # 2: image_codec column

FINDING_FLOAT_FIELDS = (
    "diameter_mm", "length_mm", "width_mm", "depth_mm", "height_mm", "area_mm2", "equivalent_diameter_mm",
    "long_axis_mm", "short_axis_mm", "mean_axis_mm", "orientation_deg", "in_region_fraction", "cnr",
)
FINDING_STRING_FIELDS = ("kind", "region", "location", "lobe", "material", "category", "margin")
FINDING_POINT_FIELDS = ("centroid", "centroid_mm", "centroid_px")  # lists of numbers ([y, x] or [x, y] as given)

FINDING = pa.struct(
    [pa.field("instance", pa.int32())]
    + [pa.field(k, pa.string()) for k in FINDING_STRING_FIELDS]
    + [pa.field("juxtapleural", pa.bool_())]
    + [pa.field(k, pa.float64()) for k in FINDING_FLOAT_FIELDS]
    + [pa.field(k, pa.list_(pa.float64())) for k in FINDING_POINT_FIELDS]
    + [pa.field("extra", pa.string())]
)

BBOX = pa.struct([pa.field(k, pa.int32()) for k in ("instance", "x0", "y0", "x1", "y1")])

QC_CHECK = pa.struct([
    pa.field("name", pa.string()), pa.field("passed", pa.bool_()), pa.field("value", pa.float64()),
    pa.field("threshold", pa.string()), pa.field("detail", pa.string()),
])

QC = pa.struct([
    pa.field("passed", pa.bool_()), pa.field("attempts", pa.int32()), pa.field("checks", pa.list_(QC_CHECK)),
    pa.field("history_json", pa.string()),
])

SEED = pa.struct([
    pa.field("spec_hash", pa.string()), pa.field("index", pa.int64()), pa.field("attempt", pa.int32()),
    pa.field("seed", pa.int64()),
])

GENERATOR = pa.struct([
    pa.field("name", pa.string()), pa.field("version", pa.string()),
    pa.field("params_json", pa.string()),  # {"request": ..., "layout": ..., "render": ...}, sorted keys
])

# The image codec of a sample (store.codecs): how to turn the stored PNG back into the image. Null in versions
# published before codecs were recorded; their image_encoding text maps to a codec explicitly.
CODEC = pa.struct([
    pa.field("name", pa.string()), pa.field("version", pa.int32()),
    pa.field("params_json", pa.string()),  # codec parameters (e.g. scale and offset), sorted keys
])

PROVENANCE = pa.struct([
    pa.field("dataset", pa.string()), pa.field("version", pa.int32()), pa.field("spec_hash", pa.string()),
    pa.field("code_version", pa.string()), pa.field("pairforge_version", pa.string()),
    pa.field("generator", pa.string()), pa.field("watermark_scheme", pa.string()),
    pa.field("synthetic", pa.bool_()),
])

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("image_path", pa.string(), nullable=False),  # relative to the version folder
        pa.field("label_path", pa.string(), nullable=False),
        pa.field("instance_path", pa.string(), nullable=False),
        pa.field("image_sha256", pa.string(), nullable=False),
        pa.field("label_sha256", pa.string(), nullable=False),
        pa.field("instance_sha256", pa.string(), nullable=False),
        pa.field("image_encoding", pa.string(), nullable=False),  # e.g. "uint16 HU+1024", "uint8 grey"
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("channels", pa.int32(), nullable=False),
        pa.field("pixel_spacing_mm", pa.float64(), nullable=False),
        pa.field("requested", pa.list_(FINDING)),
        pa.field("measured", pa.list_(FINDING)),
        pa.field("bboxes", pa.list_(BBOX)),
        pa.field("qc", QC),
        pa.field("seed", SEED),
        pa.field("generator", GENERATOR),
        pa.field("watermark_payload", pa.string()),  # 16 hex digits, null when the spec turns the mark off
        pa.field("provenance", PROVENANCE),
        pa.field("image_codec", CODEC),  # added in schema 2; absent from version-1 files
        pa.field("group", pa.string()),  # source id of samples from a user's scan/photo; null otherwise (added later)
    ],
    metadata={b"pairforge.schema": SCHEMA_VERSION.encode()},
)


def to_jsonable(x: Any) -> Any:
    """numpy scalars/arrays, tuples and sets -> plain JSON types (NaN/inf -> None), recursively."""
    t = type(x)  # the plain types first (most values): same results, without the isinstance chain
    if t is str or t is int or t is bool or x is None:
        return x
    if t is float:
        return x if math.isfinite(x) else None
    if t is dict:
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if t is list:
        return [to_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, (set, frozenset)):
        return sorted(to_jsonable(v) for v in x)
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy scalar or array
        return to_jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, bytes):
        return x.hex()
    return x


def dumps(x: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces)."""
    return json.dumps(to_jsonable(x), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def finding_row(d: dict[str, Any]) -> dict[str, Any]:
    """A finding dict (any domain) -> a FINDING struct value. Keys not in the struct go to ``extra``."""
    row: dict[str, Any] = {f.name: None for f in FINDING}
    extra: dict[str, Any] = {}
    for k, v in d.items():
        v = to_jsonable(v)
        if k == "instance" and isinstance(v, int) and not isinstance(v, bool):
            row["instance"] = v
        elif k in FINDING_STRING_FIELDS and isinstance(v, str):
            row[k] = v
        elif k == "juxtapleural" and isinstance(v, bool):
            row[k] = v
        elif k in FINDING_FLOAT_FIELDS and _num(v) is not None:
            row[k] = _num(v)
        elif k in FINDING_POINT_FIELDS and isinstance(v, list) and v and all(_num(c) is not None for c in v):
            row[k] = [_num(c) for c in v]
        else:
            extra[str(k)] = v
    row["extra"] = dumps(extra) if extra else None
    return row


def finding_dict(row: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``finding_row`` (null fields dropped, ``extra`` merged back)."""
    out = {k: v for k, v in row.items() if k != "extra" and v is not None}
    if row.get("extra"):
        out.update(json.loads(row["extra"]))
    return out


def qc_check_row(c: dict[str, Any]) -> dict[str, Any]:
    """A QC check dict -> QC_CHECK. A non-numeric value is kept in ``detail`` (as JSON with the detail)."""
    value = _num(c.get("value"))
    detail = c.get("detail")
    if c.get("value") is not None and value is None:
        detail = dumps({"detail": detail, "value": to_jsonable(c["value"])})
    thr = c.get("threshold")
    return {"name": str(c.get("name", "")), "passed": bool(c.get("passed", False)), "value": value,
            "threshold": None if thr is None else (thr if isinstance(thr, str) else dumps(thr)),
            "detail": None if detail is None else str(detail)}


def bbox_row(b: dict[str, Any]) -> dict[str, Any]:
    return {k: (int(b[k]) if b.get(k) is not None else None) for k in ("instance", "x0", "y0", "x1", "y1")}
