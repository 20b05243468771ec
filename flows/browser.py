"""A static browser for a published version: ``index.html`` (thumbnail grid with overlays, filters by finding kind,
size range, region or lobe and split) and ``sample.html#<id>`` (image, label, overlay, measurements, QC and the
drawn parameters), written beside the card at publish time. Static files only (no CDN, no server): the data is a
script (``browser/data.js``), so the pages work opened from a folder (file://), a web server or an object store.

Filters are also read from the address (``index.html#kind=scratch&split=test&min=2&max=5&region=RLL``), so a link
can carry a view. Every byte is a function of the version (no clocks), like the rest of the card.
"""
from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

THUMB_PX = 128
SIZE_KEYS = ("equivalent_diameter_mm", "diameter_mm", "length_mm")  # the first a finding has is its size
REGION_KEYS = ("lobe", "region", "location")  # the first a finding has is its region
COLUMNS = ["sample_id", "split", "image_path", "label_path", "instance_path", "pixel_spacing_mm", "requested",
           "measured", "qc", "seed", "generator", "image_codec", "image_encoding"]


def _size(f: dict) -> float | None:
    for k in SIZE_KEYS:
        if isinstance(f.get(k), (int, float)):
            return float(f[k])
    a = f.get("area_mm2")
    return math.sqrt(4 * float(a) / math.pi) if isinstance(a, (int, float)) else None


def _region(f: dict) -> str | None:
    for k in REGION_KEYS:
        if f.get(k) not in (None, "", "any"):
            return str(f[k])
    return None


_LUTS: dict[int, tuple[Any, np.ndarray]] = {}


def _colours(class_table, n: int = 256) -> np.ndarray:
    """The label picture's colour per class id (the class table's colours, fixed random ones for the rest)."""
    key = id(class_table)
    if key not in _LUTS or _LUTS[key][0] is not class_table or n != 256:
        _LUTS[key] = (class_table, _make_colours(class_table, n))
    return _LUTS[key][1]


def _make_colours(class_table, n: int = 256) -> np.ndarray:
    lut = np.zeros((max(n, 256), 3), np.uint8)
    rng = np.random.default_rng(7)
    lut[1:] = rng.integers(60, 255, (lut.shape[0] - 1, 3))
    for k, c in (getattr(class_table, "colors", None) or {}).items():
        lut[int(k)] = c
    return lut


_VIEW_LUTS: dict[tuple, np.ndarray] = {}


def _view(stored: np.ndarray, row: dict, domain) -> np.ndarray:
    """8-bit view for people: decoded by the row's codec, shown through the domain's display window.
    16-bit images of a pointwise codec through a fixed window go through a table of all 65,536 stored values (the
    same numbers: every value is decoded and windowed by the same calls, once per codec and window, not once per
    pixel)."""
    from annotators.overlay import display
    from store.codecs import codec_for_row

    codec = codec_for_row(row)
    win = domain.display_window if domain is not None else None
    if stored.dtype == np.uint16 and win is not None and codec.pointwise:
        key = (type(codec), codec.version, json.dumps(codec.params, sort_keys=True, default=str), tuple(win))
        if key not in _VIEW_LUTS:
            _VIEW_LUTS[key] = display(codec.decode(np.arange(65536, dtype=np.uint16)), win)
        return np.take(_VIEW_LUTS[key], stored)  # the same values as indexing, at half its cost
    return display(codec.decode(stored), win)


# Per sample: a thumbnail with outlines, the 8-bit view, the outlines alone (an indexed PNG, transparent where
# nothing is drawn: the sample page lays it over the view, so the full-size overlay costs a few KB, not an RGB
# image) and the label map in class colours.
IMAGE_KINDS = ("thumb", "view", "outline", "label")
# The view is a picture for people, not data (the sample's image PNG is the data): a baseline JPEG at this quality,
# ~40 % of the PNG's bytes and a third of its encoding time; PSNR >= 40 dB against the 8-bit view
# (tests/test_browser_shards.py). Outlines, thumbnails and label pictures stay PNG: sharp lines and exact colours.
VIEW_JPEG_QUALITY = 90
IMAGE_EXT = {"thumb": "png", "view": "jpg", "outline": "png", "label": "png"}


def image_paths(sample_id: str) -> list[str]:
    """The browser's images of one sample, relative to the version."""
    return [f"browser/img/{sample_id}_{kind}.{IMAGE_EXT[kind]}" for kind in IMAGE_KINDS]


def encode_view(view: np.ndarray) -> bytes:
    """The 8-bit view (grey, or RGB in RGB order) as baseline JPEG bytes (OpenCV's libjpeg-turbo: the same pixels
    give the same bytes; no metadata)."""
    import cv2

    bgr = cv2.cvtColor(view, cv2.COLOR_RGB2BGR) if view.ndim == 3 and view.shape[2] == 3 else view
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, VIEW_JPEG_QUALITY])
    if not ok:
        raise ValueError(f"could not encode a {view.dtype} {view.shape} view as JPEG")
    return buf.tobytes()


def draw_sample(img: np.ndarray, lab: np.ndarray, ins: np.ndarray, row: dict, domain,
                label_png: bytes | None = None) -> dict[str, bytes]:
    """One sample's browser images from its stored image, label (uint8) and instance map (uint16): a thumbnail with
    outlines, the 8-bit view, the full-size outlines (a transparent layer for the view) and the label in class
    colours, as PNG bytes by path (the view: JPEG bytes, ``encode_view``). ``label_png``: the label's published PNG,
    whose compressed rows the label picture reuses (the same bytes as encoding ``lab`` again)."""
    import cv2

    from annotators.overlay import instance_outline, outline, outline_layer
    from store.codec import encode_png, grey_png_as_indexed

    class_table = domain.classes if domain is not None else None
    outline_ids = list(domain.outline_classes) if domain is not None and domain.outline_classes else None
    view = _view(img, row, domain)
    layer, layer_palette, clear = outline_layer(lab, ins, class_table, classes=outline_ids)
    scale = THUMB_PX / max(view.shape[:2])
    size = (max(1, round(view.shape[1] * scale)), max(1, round(view.shape[0] * scale)))
    tv = cv2.resize(view, size, interpolation=cv2.INTER_AREA)
    tl = cv2.resize(lab, size, interpolation=cv2.INTER_NEAREST)
    ti = cv2.resize(ins, size, interpolation=cv2.INTER_NEAREST)
    trgb = outline(tv, tl, class_table, classes=outline_ids) if class_table is not None else tv
    colours = _colours(class_table)
    label_pic = grey_png_as_indexed(label_png, colours) if label_png is not None else None
    thumb, view_p, outline_p, label_p = image_paths(row["sample_id"])
    return {thumb: encode_png(instance_outline(trgb, ti, thickness=1)), view_p: encode_view(view),
            outline_p: encode_png(layer, png_filter="none", palette=layer_palette, transparent=clear),
            label_p: label_pic or encode_png(lab, png_filter="none", palette=colours)}


_DOMAINS: dict[str, Any] = {}


def sample_files(sample, stored: np.ndarray, row: dict, files: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """``BuildStaging.write_shard``'s per-sample hook: the browser images of a sample, drawn in the shard's worker
    from the arrays it holds (no PNG decoding at publish). The same bytes ``write_browser`` would draw from the
    published files; 2-D PNG images only (other codecs get the card's views)."""
    if not str(row["image_path"]).endswith(".png"):
        return {}
    if sample.domain not in _DOMAINS:
        from schemas.domain import get_domain

        try:
            _DOMAINS[sample.domain] = get_domain(sample.domain)
        except KeyError:
            _DOMAINS[sample.domain] = None
    return draw_sample(stored, np.asarray(sample.label, np.uint8), np.asarray(sample.instance, np.uint16), row,
                       _DOMAINS[sample.domain], label_png=(files or {}).get(row["label_path"]))


# ``browser/data.js`` holds what the index page filters and shows (id, split, finding kinds, sizes, regions, QC
# passed): ~115 bytes a sample. A sample page's measurements, QC checks and drawn parameters (~7 KB a CT sample) are
# in ``browser/detail/<k>.js``, samples k*DETAIL_CHUNK to (k+1)*DETAIL_CHUNK - 1 in index order: the index page of
# 10,000 samples loads ~1.2 MB, not ~72 MB, and a sample page one chunk (~700 KB).
DETAIL_CHUNK = 100


def detail_path(k: int) -> str:
    return f"browser/detail/{k:05d}.js"


def write_browser(fs, base: str, manifest: Any, domain) -> list[str]:
    """Write index.html, sample.html and browser/* under ``base`` (an fsspec filesystem path); returns them.
    A sample whose images the shards already wrote (``sample_files``) is not drawn again."""
    import pyarrow.parquet as pq

    from schemas.arrow import finding_dict
    from store.codec import decode_png

    with fs.open(f"{base}/samples.parquet", "rb") as f:
        pf = pq.ParquetFile(f)
        rows = pf.read(columns=[c for c in COLUMNS if c in pf.schema_arrow.names]).to_pylist()
    if any(not str(r["image_path"]).endswith(".png") for r in rows):
        return []  # the browser shows 2-D PNG images; other codecs (NIfTI volumes) have the card's tri-planar views
    written: list[str] = []
    fs.makedirs(f"{base}/browser/img", exist_ok=True)
    fs.makedirs(f"{base}/browser/detail", exist_ok=True)
    try:  # one folder: its names, without a stat per file (fsspec's find stats each one)
        there = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{base}/browser/img", detail=False)}
    except FileNotFoundError:
        there = set()

    def put(rel: str, data: bytes) -> None:
        fs.pipe_file(f"{base}/{rel}", data)
        written.append(rel)

    def one(r: dict) -> dict:
        sid = r["sample_id"]
        paths = image_paths(sid)
        if all(p.rsplit("/", 1)[-1] in there for p in paths):
            written.extend(paths)  # drawn by the shard's worker (sample_files)
        else:
            img = decode_png(fs.cat_file(f"{base}/{r['image_path']}"))
            label_png = fs.cat_file(f"{base}/{r['label_path']}")
            lab = decode_png(label_png)
            ins = decode_png(fs.cat_file(f"{base}/{r['instance_path']}"))
            for rel, data in draw_sample(img, lab, ins, r, domain, label_png=label_png).items():
                put(rel, data)
        req = [finding_dict(f) for f in r["requested"] or []]
        mea = [finding_dict(f) for f in r["measured"] or []]
        sizes = [s for s in (_size(f) for f in mea) if s is not None]
        qc = r["qc"] or {}
        if isinstance(qc, str):
            qc = {}
        entry = {"id": sid, "split": r["split"], "kinds": sorted({f.get("kind") for f in req if f.get("kind")}),
                 "sizes": [round(s, 3) for s in sizes], "regions": sorted({g for g in map(_region, mea) if g}),
                 "qc_passed": bool(qc.get("passed", True))}
        detail = {"spacing_mm": r.get("pixel_spacing_mm"),
                  "qc": [{k: c.get(k) for k in ("name", "passed", "value", "threshold", "detail")}
                         for c in (qc.get("checks") or [])],
                  "requested": req, "measured": mea, "seed": r.get("seed"), "generator": r.get("generator"),
                  "codec": r.get("image_encoding")}
        return entry, detail

    # Decoding, drawing and PNG encoding release the GIL: one thread per core (publish runs in one process).
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        done = list(pool.map(one, rows))
    order = {rel: k for k, rel in enumerate(p for r in rows for p in image_paths(r["sample_id"]))}
    written.sort(key=order.__getitem__)  # the threads finish in any order; the list keeps the rows' order
    m = manifest
    get = (lambda k: getattr(m, k, None) if not isinstance(m, dict) else m.get(k))
    data = {"name": get("name"), "version": get("version"), "domain": get("domain"),
            "class_table": dict(get("class_table") or {}), "samples": [e for e, _ in done],
            "detail_chunk": DETAIL_CHUNK, "image_ext": IMAGE_EXT,
            "synthetic": "Synthetic data generated by pairforge; no patient, part or person was imaged."}
    put("browser/data.js", ("window.PF = " + json.dumps(data, sort_keys=True, default=str) + ";\n").encode())
    # What only a sample page shows, DETAIL_CHUNK samples a file (the index page loads none of it).
    for k in range(0, len(done), DETAIL_CHUNK):
        chunk = {e["id"]: d for e, d in done[k:k + DETAIL_CHUNK]}
        put(detail_path(k // DETAIL_CHUNK),
            (f"PFB.details({k // DETAIL_CHUNK}, " + json.dumps(chunk, sort_keys=True, default=str) + ");\n").encode())
    put("browser/app.js", APP_JS.encode())
    put("index.html", INDEX_HTML.encode())
    put("sample.html", SAMPLE_HTML.encode())
    return written


def browser_url(store, ref: str) -> str:
    """The address of a published version's ``index.html`` (file:// for a local root); a SpecError when the version
    was published without the browser."""
    from schemas.errors import SpecError

    name, version = store.resolve(ref)
    root = store.root
    path = root.join(name, f"v{version}", "index.html")
    if not root.exists(path):
        raise SpecError(f"{name}@v{version} has no index.html (published before the browser existed); "
                        "rebuild it to get one")
    if root.local:
        import pathlib

        return pathlib.Path(path).resolve().as_uri()
    return root.fs.unstrip_protocol(path)


STYLE = """<style>
body{font:14px system-ui,sans-serif;margin:12px;background:#fafafa;color:#222}
.grid{display:flex;flex-wrap:wrap;gap:8px}.tile{background:#fff;border:1px solid #ddd;padding:4px;width:136px;
text-decoration:none;color:#222;font-size:11px}.tile img{width:128px;height:128px;object-fit:contain;display:block}
.bar{display:flex;gap:12px;flex-wrap:wrap;align-items:center;margin:8px 0}.fail{border-color:#d33}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px;text-align:left}
.imgs img{width:320px;image-rendering:pixelated;margin-right:6px;border:1px solid #ccc}
.stack{position:relative;display:inline-block}.stack img.layer{position:absolute;left:0;top:0}pre{font-size:11px;white-space:pre-wrap}
</style>"""

INDEX_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>pairforge version browser</title>
""" + STYLE + """</head><body>
<h2 id="title">pairforge version</h2><p id="note"></p>
<div class="bar">
<label>kind <select id="kind"><option value="">any</option><option value="-">none (negatives)</option></select></label>
<label>size mm <input id="min" type="number" step="0.1" style="width:5em" placeholder="min"> -
<input id="max" type="number" step="0.1" style="width:5em" placeholder="max"></label>
<label>region <select id="region"><option value="">any</option></select></label>
<label>split <select id="split"><option value="">any</option></select></label>
<span>shown: <b id="count">0</b> of <span id="total">0</span></span></div>
<div class="grid" id="grid"></div>
<script src="browser/data.js"></script><script src="browser/app.js"></script>
<script>PFB.index();</script></body></html>
"""

SAMPLE_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>pairforge sample</title>
""" + STYLE + """</head><body><p><a href="index.html">&larr; all samples</a></p>
<h2 id="title">sample</h2><div class="imgs" id="imgs"></div><div id="info"></div>
<script src="browser/data.js"></script><script src="browser/app.js"></script>
<script>PFB.sample();</script></body></html>
"""

APP_JS = r"""
var PFB = (function () {
  var D = window.PF, $ = function (id) { return document.getElementById(id); };
  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) { return {"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;"}[c]; }); }
  function params() { var p = {}; location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
    if (!kv) return; var i = kv.indexOf("="); p[decodeURIComponent(kv.slice(0, i))] = decodeURIComponent(kv.slice(i + 1)); }); return p; }
  function opts(sel, values) { values.forEach(function (v) { var o = document.createElement("option"); o.value = v; o.textContent = v; sel.appendChild(o); }); }
  function uniq(f) { var s = {}; D.samples.forEach(function (x) { f(x).forEach(function (v) { s[v] = 1; }); }); return Object.keys(s).sort(); }
  function keep(x, f) {
    if (f.kind === "-" && x.kinds.length) return false;
    if (f.kind && f.kind !== "-" && x.kinds.indexOf(f.kind) < 0) return false;
    if (f.split && x.split !== f.split) return false;
    if (f.region && x.regions.indexOf(f.region) < 0) return false;
    var lo = f.min === "" || f.min === undefined ? -Infinity : +f.min, hi = f.max === "" || f.max === undefined ? Infinity : +f.max;
    if (lo !== -Infinity || hi !== Infinity) { if (!x.sizes.some(function (s) { return s >= lo && s <= hi; })) return false; }
    return true; }
  function render() {
    var f = {kind: $("kind").value, split: $("split").value, region: $("region").value, min: $("min").value, max: $("max").value};
    var shown = D.samples.filter(function (x) { return keep(x, f); });
    $("grid").innerHTML = shown.map(function (x) {
      return '<a class="tile' + (x.qc_passed ? '' : ' fail') + '" href="sample.html#' + esc(x.id) + '"><img loading="lazy" src="browser/img/' +
        esc(x.id) + '_thumb.' + D.image_ext.thumb + '" alt=""><div>' + esc(x.id) + ' &middot; ' + esc(x.split) + '</div><div>' +
        esc(x.kinds.join(", ") || "no findings") + '</div></a>'; }).join("");
    $("count").textContent = shown.length;
    var h = []; Object.keys(f).forEach(function (k) { if (f[k]) h.push(k + "=" + encodeURIComponent(f[k])); });
    history.replaceState(null, "", h.length ? "#" + h.join("&") : location.pathname); }
  function index() {
    $("title").textContent = D.name + " v" + D.version + " (" + D.domain + ")"; $("note").textContent = D.synthetic;
    $("total").textContent = D.samples.length;
    opts($("kind"), uniq(function (x) { return x.kinds; })); opts($("region"), uniq(function (x) { return x.regions; }));
    opts($("split"), uniq(function (x) { return [x.split]; }));
    var p = params(); ["kind", "split", "region", "min", "max"].forEach(function (k) { if (p[k] !== undefined) $(k).value = p[k]; });
    ["kind", "split", "region", "min", "max"].forEach(function (k) { $(k).addEventListener("input", render); $(k).addEventListener("change", render); });
    render(); }
  function table(rows) { if (!rows.length) return "<p>none</p>"; var keys = [];
    rows.forEach(function (r) { Object.keys(r).forEach(function (k) { if (keys.indexOf(k) < 0) keys.push(k); }); });
    return "<table><tr>" + keys.map(function (k) { return "<th>" + esc(k) + "</th>"; }).join("") + "</tr>" + rows.map(function (r) {
      return "<tr>" + keys.map(function (k) { var v = r[k]; return "<td>" + esc(v === undefined || v === null ? "" : typeof v === "object" ? JSON.stringify(v) : v) + "</td>"; }).join("") + "</tr>"; }).join("") + "</table>"; }
  function sample() {
    var id = decodeURIComponent(location.hash.replace(/^#/, "")), x = null, at = -1;
    D.samples.forEach(function (s, i) { if (s.id === id) { x = s; at = i; } });
    if (!x) { $("title").textContent = "no sample " + id; return; }
    var k = Math.floor(at / D.detail_chunk), el = document.createElement("script");
    el.src = "browser/detail/" + String(k).padStart(5, "0") + ".js";  // calls details(k, {id: ...}) once loaded
    wanted = x; document.body.appendChild(el); }
  var wanted = null;
  function details(k, chunk) {
    if (!wanted || !chunk[wanted.id]) return;
    var x = Object.assign({}, wanted, chunk[wanted.id]);
    $("title").textContent = D.name + " v" + D.version + " / sample " + x.id + " (" + x.split + ")";
    var src = function (k) { return 'src="browser/img/' + esc(x.id) + "_" + k + "." + D.image_ext[k] + '"'; };
    $("imgs").innerHTML = ["view", "label"].map(function (k) {
      return '<figure style="display:inline-block;margin:0"><img id="img-' + k + '" ' + src(k) + "><figcaption>" + k + "</figcaption></figure>"; }).join("") +
      '<figure style="display:inline-block;margin:0"><div class="stack"><img id="img-overlay" ' + src("view") +
      '><img id="img-outline" class="layer" ' + src("outline") + '></div><figcaption>overlay</figcaption></figure>';
    $("info").innerHTML = "<p>spacing " + esc(x.spacing_mm) + " mm &middot; " + esc(x.codec || "") + " &middot; QC " + (x.qc_passed ? "passed" : "FAILED") + "</p>" +
      "<h3>Measurements</h3><div id=\"measured\">" + table(x.measured) + "</div>" +
      "<h3>QC</h3>" + table(x.qc) + "<h3>Drawn parameters</h3>" + table(x.requested) +
      "<pre>seed " + esc(JSON.stringify(x.seed)) + "\n" + esc(JSON.stringify(x.generator)) + "</pre>"; }
  return {index: index, sample: sample, details: details, keep: keep};
})();
"""
