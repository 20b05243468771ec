"""The dataset card of a published version: README.md with the spec, counts and small matplotlib plots.

``card(version_dir, manifest)`` is handed to ``BuildStaging.publish``; it reads what it shows from the staged
``samples.parquet`` and PNGs and writes ``README.md`` plus ``card/*.png`` before the manifest is written.
Every byte is a function of the data (no clocks, no run ids), so rebuilding a version gives the same card.
"""
from __future__ import annotations

import io
from collections import Counter, defaultdict
from typing import Any, Callable

import numpy as np

# Finding fields per domain: (requested size, measured size, region); the first pair present is used.
SIZE_FIELDS = (("diameter_mm", "equivalent_diameter_mm"), ("length_mm", "length_mm"), ("diameter_mm", "diameter_mm"))
REGION_FIELDS = ("lobe", "region", "location")
GRID_SAMPLES = 8
CARD_COLUMNS = ["sample_id", "split", "image_path", "label_path", "instance_path", "image_encoding", "image_codec",
                "requested", "measured", "qc", "group"]
THUMB_PX = 160


def _domain(name: str | None):
    """The registered Domain (class table, display window, outlined classes, card hooks), or None if unknown."""
    from schemas.domain import get_domain

    try:
        return get_domain(name or "")
    except KeyError:
        return None


def _fs(version_dir: str, storage_options: dict | None = None):
    from fsspec.core import url_to_fs

    return url_to_fs(str(version_dir), **(storage_options or {}))


def _findings(rows: list[dict], key: str) -> list[list[dict]]:
    from schemas.arrow import finding_dict

    return [[finding_dict(f) for f in (r.get(key) or [])] for r in rows]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "svg.hashsalt": "pairforge"})
    return plt


def warm_up(plots: bool = True) -> None:
    """Import matplotlib (``plots``: where the card's plots are drawn in this process) and pyarrow's dataset layer
    (Parquet reads; it pulls in pandas) ahead of time, about 1.3 s here, so publishing and the card cost no
    imports."""
    if plots:
        _pyplot()
    import pyarrow.dataset  # noqa: F401


def _png(fig, palette: list[tuple[int, int, int]] | None = None) -> bytes:
    """PNG bytes of a figure; sample grids are mapped onto a fixed palette to keep them a few tens of KB."""
    buf = io.BytesIO()
    # A tight box: long region names and axis labels are never cut off at the figure's edge.
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None}, bbox_inches="tight", pad_inches=0.04)
    _pyplot().close(fig)
    if palette is None:
        return buf.getvalue()
    from PIL import Image

    flat = [c for rgb in palette for c in rgb]
    pal = Image.new("P", (1, 1))
    pal.putpalette(flat + flat[-3:] * (256 - len(palette)))
    im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB").quantize(palette=pal, dither=Image.Dither.NONE)
    out = io.BytesIO()
    im.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _grid_palette(class_table, ids: list[int] | None) -> list[tuple[int, int, int]]:
    greys = [(g, g, g) for g in np.linspace(0, 255, 24).round().astype(int).tolist()]
    colours = [(255, 220, 0)]
    if class_table is not None:
        colours += [tuple(class_table.colors[k]) for k in (ids or sorted(class_table.colors)) if k in class_table.colors]
    return greys + list(dict.fromkeys(colours))[: 256 - len(greys)]


# ------------------------------------------------------------------------------------------------ plots
def plot_sizes(requested: list[list[dict]], measured: list[list[dict]]) -> tuple[bytes | None, dict]:
    """Requested vs measured finding size (paired by instance) and both distributions."""
    # Each finding is compared on the first size both sides have (a nodule's diameter, a scratch's length, a dent's
    # diameter), so every kind counts, not only the kind that has the first field of the list.
    pairs, kinds, used = [], [], []
    for req, mea in zip(requested, measured):
        by_inst = {f.get("instance"): f for f in mea}
        for i, f in enumerate(req):
            m = by_inst.get(f.get("instance", i + 1))
            keys = next(((rq, ms) for rq, ms in SIZE_FIELDS if m is not None and f.get(rq) is not None
                         and m.get(ms) is not None), None)
            if keys is not None:
                pairs.append((float(f[keys[0]]), float(m[keys[1]])))
                kinds.append(str(f.get("kind") or "?"))
                used.append(keys)
    if not pairs:
        return None, {}
    a = np.array(pairs)
    err = a[:, 1] - a[:, 0]
    rq_key, ms_key = Counter(used).most_common(1)[0][0]
    by_kind = {}
    for kind in sorted(set(kinds)):
        e = err[np.array(kinds) == kind]
        kk = Counter(u for u, k in zip(used, kinds) if k == kind).most_common(1)[0][0]
        by_kind[kind] = {"n": int(e.size), "requested": kk[0], "measured": kk[1], "mean_error_mm": float(e.mean()),
                         "mean_abs_error_mm": float(np.abs(e).mean()), "max_abs_error_mm": float(np.abs(e).max())}
    stats = {"n": len(a), "requested": rq_key, "measured": ms_key, "mean_error_mm": float(err.mean()),
             "mean_abs_error_mm": float(np.abs(err).mean()), "max_abs_error_mm": float(np.abs(err).max()),
             "by_kind": by_kind}
    plt = _pyplot()
    # Fixed margins: constrained layout cost ~0.5 s per card on the serial publish path.
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(7.2, 2.8))
    fig.subplots_adjust(left=0.08, right=0.99, bottom=0.16, top=0.91, wspace=0.25)
    lo, hi = float(a.min()) * 0.9, float(a.max()) * 1.05
    ax1.plot([lo, hi], [lo, hi], color="0.6", lw=0.8, ls="--")
    ax1.scatter(a[:, 0], a[:, 1], s=6, alpha=0.7, lw=0)
    ax1.set(xlabel="requested size (mm)", ylabel="measured size (mm)", title="requested vs measured size")
    bins = np.linspace(lo, hi, 25)
    ax2.hist(a[:, 0], bins=bins, alpha=0.6, label="requested")
    ax2.hist(a[:, 1], bins=bins, alpha=0.6, label="measured")
    ax2.set(xlabel="size (mm)", ylabel="findings", title="size distribution")
    ax2.legend(frameon=False)
    return _png(fig), stats


def region_counts(measured: list[list[dict]]) -> dict[str, int]:
    c: Counter = Counter()
    for fs in measured:
        for f in fs:
            key = next((f[k] for k in REGION_FIELDS if f.get(k)), "unknown")
            c[_region_name(key)] += 1
    return dict(sorted(c.items()))


def _region_name(v) -> str:
    """A region as people write it: a point {'x_mm': 20, 'y_mm': 15} -> 'at (20, 15) mm'; names as they are."""
    if isinstance(v, str) and v.startswith("{"):
        import json

        try:
            v = json.loads(v.replace("'", '"'))
        except ValueError:
            return v
    if isinstance(v, dict):
        if "x_mm" in v and "y_mm" in v:
            return f"at ({float(v['x_mm']):g}, {float(v['y_mm']):g}) mm"
        return ", ".join(f"{k} {val}" for k, val in v.items())
    return str(v)


def plot_regions(counts: dict[str, int]) -> bytes | None:
    if not counts:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 2.6))
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.2, top=0.9)
    ax.bar(list(counts), list(counts.values()), color="#4c72b0")
    ax.set(ylabel="findings", title="measured findings per region")
    ax.tick_params(axis="x", rotation=30)
    return _png(fig)


def qc_rates(rows: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
    """Pass rate per QC check (numbered checks like size_2 folded into size) and per split."""
    passed: dict[str, list[bool]] = defaultdict(list)
    by_split: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        qc = r.get("qc") or {}
        by_split[r["split"]].append(bool(qc.get("passed")))
        for c in qc.get("checks") or []:
            name = c["name"]
            base, _, tail = name.rpartition("_")
            passed[base if tail.isdigit() and base else name].append(bool(c["passed"]))
    return ({k: float(np.mean(v)) for k, v in sorted(passed.items())},
            {k: float(np.mean(v)) for k, v in sorted(by_split.items())})


def first_attempt_pass_rate(rows: list[dict]) -> float | None:
    """Share of samples whose first generation attempt passed QC (from the recorded QC history)."""
    import json

    firsts = []
    for r in rows:
        hist = json.loads((r.get("qc") or {}).get("history_json") or "[]")
        if hist:
            firsts.append(bool(hist[0].get("passed")))
    return float(np.mean(firsts)) if firsts else None


def plot_qc(per_check: dict[str, float], attempts: list[int]) -> bytes | None:
    if not per_check:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(7.2, 2.8), gridspec_kw={"width_ratios": [2, 1]})
    longest = max(len(n) for n in per_check)
    fig.subplots_adjust(left=min(0.45, 0.04 + 0.0105 * longest), right=0.98, bottom=0.16, top=0.91, wspace=0.3)
    names = list(per_check)
    ax1.barh(names, [100 * per_check[n] for n in names], color="#55a868")
    ax1.set(xlim=(0, 100), xlabel="% passed", title="QC pass rate per check")
    ax1.invert_yaxis()
    c = Counter(attempts)
    ks = sorted(c)
    ax2.bar([str(k) for k in ks], [c[k] for k in ks], color="#8172b2")
    ax2.set(xlabel="attempts", ylabel="samples", title="generation attempts")
    return _png(fig)


def _view(stored: np.ndarray, row: dict, domain) -> np.ndarray:
    """8-bit view for people: the image decoded by the codec its row records, shown through the domain's display
    window (e.g. a lung window for HU); 8-bit images as they are."""
    from annotators.overlay import display
    from store.codecs import codec_for_row

    img = codec_for_row(row).decode(stored)
    return display(img, domain.display_window if domain is not None else None)


def plot_grid(fs, base: str, rows: list[dict], domain) -> bytes | None:
    """A grid of samples (spread over the version) with label outlines (the classes the domain names in
    ``outline_classes``, or all) and findings outlined in yellow."""
    import cv2

    from annotators.overlay import instance_outline, outline
    from schemas.domain import import_hook
    from store.codecs import codec_for_row

    if not rows:
        return None
    with_findings = [r for r in rows if r.get("measured")]
    pool = with_findings if len(with_findings) >= GRID_SAMPLES else rows
    class_table = domain.classes if domain is not None else None
    outline_ids = list(domain.outline_classes) if domain is not None and domain.outline_classes else None
    pick = [pool[int(i)] for i in np.linspace(0, len(pool) - 1, min(GRID_SAMPLES, len(pool))).round()]
    # A domain whose samples are not planes (volumes) makes the plane to show:
    # ``card_view(stored image, label, instance, meta) -> (image, label, instance)``, meta from the codec's file.
    plane = import_hook(domain, domain.hooks_module, "card_view") if domain is not None else None
    tiles = []
    for r in pick:
        c = codec_for_row(r)
        img, meta = c.read_meta(fs.cat_file(f"{base}/{r['image_path']}"))
        lab = c.map_from_bytes(fs.cat_file(f"{base}/{r['label_path']}"))
        ins = c.map_from_bytes(fs.cat_file(f"{base}/{r['instance_path']}"))
        if plane is not None:
            img, lab, ins = plane(img, lab, ins, meta)
        view = _view(img, r, domain)
        # Outline at thumbnail size (labels resized nearest-neighbour) so the outlines stay crisp.
        scale = THUMB_PX / max(view.shape[:2])
        size = (round(view.shape[1] * scale), round(view.shape[0] * scale))
        view = cv2.resize(view, size, interpolation=cv2.INTER_AREA)
        lab = cv2.resize(lab, size, interpolation=cv2.INTER_NEAREST)
        ins = cv2.resize(ins, size, interpolation=cv2.INTER_NEAREST)
        rgb = outline(view, lab, class_table, classes=outline_ids) if class_table is not None else view
        tiles.append((instance_outline(rgb, ins, thickness=1), r))
    plt = _pyplot()
    cols = min(4, len(tiles))
    nrows = (len(tiles) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(1.9 * cols, 2.05 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (t, r) in zip(axes.ravel(), tiles):
        ax.imshow(t if t.ndim == 3 else t, cmap=None if t.ndim == 3 else "gray", interpolation="nearest")
        ax.set_title(f"{r['sample_id']} ({r['split']}, {len(r.get('measured') or [])} f.)", fontsize=7)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.01, wspace=0.04, hspace=0.15)
    return _png(fig, palette=_grid_palette(class_table, outline_ids))


# ------------------------------------------------------------------------------------------------ README
def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _mget(m: Any, key: str, default: Any = None) -> Any:
    return m.get(key, default) if isinstance(m, dict) else getattr(m, key, default)


def render_readme(m: Any, rows: list[dict], requested: list[list[dict]], measured: list[list[dict]],
                  plots: dict[str, str], size_stats: dict, regions: dict[str, int], per_check: dict[str, float],
                  per_split_qc: dict[str, float]) -> str:
    name, version, domain = _mget(m, "name"), _mget(m, "version"), _mget(m, "domain")
    counts = _mget(m, "counts")
    code = _mget(m, "code")
    lines = [f"# {name} v{version}", ""]
    desc = (_mget(m, "spec") or {}).get("description")
    if desc:
        lines += [desc, ""]
    lines += [f"Synthetic **{domain}** images paired with pixel-exact segmentation labels, made by pairforge "
              f"(code version `{_mget(code, 'code_version')}`) from the spec below. Spec hash `{_mget(m, 'spec_hash')}`.",
              ""]
    # Counts per split and finding class.
    splits = sorted({r["split"] for r in rows}, key=lambda s: ("train", "val", "test").index(s) if s in
                    ("train", "val", "test") else 9)
    kinds = sorted({f.get("kind", "?") for fs in measured for f in fs})
    per: dict[tuple[str, str], int] = Counter()
    negatives: Counter = Counter()
    for r, fs in zip(rows, measured):
        if not fs:
            negatives[r["split"]] += 1
        for f in fs:
            per[(r["split"], f.get("kind", "?"))] += 1
    n_split = Counter(r["split"] for r in rows)
    lines += ["## Contents", ""]
    body = [[s, n_split[s], negatives[s]] + [per[(s, k)] for k in kinds] for s in splits]
    body.append(["**all**", len(rows), sum(negatives.values())] + [sum(per[(s, k)] for s in splits) for k in kinds])
    lines += _table(["split", "samples", "no finding"] + [f"{k} findings" for k in kinds], body) + [""]
    cls = _mget(counts, "class_samples") or {}
    if cls:
        lines += ["Label classes (samples containing each class, and labelled pixels):", ""]
        pix = _mget(counts, "class_pixels") or {}
        lines += _table(["class", "samples", "pixels"], [[k, v, pix.get(k, "")] for k, v in cls.items()]) + [""]
    # Sizes.
    lines += ["## Finding sizes: requested vs measured", ""]
    if size_stats:
        lines += [f"{size_stats['n']} findings; measured `{size_stats['measured']}` (from the label map) minus requested "
                  f"`{size_stats['requested']}`: mean {size_stats['mean_error_mm']:+.3f} mm, mean |error| "
                  f"{size_stats['mean_abs_error_mm']:.3f} mm, max |error| {size_stats['max_abs_error_mm']:.3f} mm.", ""]
        if len(size_stats.get("by_kind") or {}) > 1:
            lines += ["| kind | findings | size compared | mean error (mm) | mean abs error (mm) | max abs error (mm) |",
                      "| --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {k} | {s['n']} | {s['requested']} -> {s['measured']} | {s['mean_error_mm']:+.3f} | "
                      f"{s['mean_abs_error_mm']:.3f} | {s['max_abs_error_mm']:.3f} |"
                      for k, s in size_stats["by_kind"].items()]
            lines += [""]
    else:
        lines += ["No findings with sizes in this version.", ""]
    if "sizes" in plots:
        lines += [f"![finding sizes]({plots['sizes']})", ""]
    lines += ["## Findings per region", ""]
    if regions:
        lines += _table(["region", "findings"], [[k, v] for k, v in regions.items()]) + [""]
    if "regions" in plots:
        lines += [f"![findings per region]({plots['regions']})", ""]
    groups = Counter(r.get("group") for r in rows if r.get("group"))
    if groups:  # samples made from the user's own scans or photos
        lines += ["## Sources", "", f"{len(groups)} sources used; samples per source (a source's id is the start of "
                  "the sha256 of its files; `group` in `samples.parquet`):", ""]
        lines += _table(["source", "samples"], [[k, v] for k, v in sorted(groups.items())]) + [""]
    lines += ["## Quality control", ""]
    qc_failed = sum(1 for r in rows if not (r.get("qc") or {}).get("passed"))
    first = first_attempt_pass_rate(rows)
    lines += [f"{len(rows) - qc_failed} of {len(rows)} samples passed every check "
              f"({100 * (len(rows) - qc_failed) / max(len(rows), 1):.1f} %)"
              + (f"; {100 * first:.1f} % passed on their first attempt, the rest were regenerated from derived seeds"
                 if first is not None else "")
              + ". Samples that failed all their attempts are kept and flagged in `samples.parquet` (`qc.passed`).", ""]
    if per_split_qc:
        lines += _table(["split", "QC pass rate"], [[k, f"{100 * v:.1f} %"] for k, v in per_split_qc.items()]) + [""]
    if per_check:
        lines += _table(["check", "pass rate"], [[k, f"{100 * v:.1f} %"] for k, v in per_check.items()]) + [""]
    if "qc" in plots:
        lines += [f"![QC pass rates]({plots['qc']})", ""]
    extra = [(k.split(":", 1)[1], v) for k, v in plots.items() if k.startswith("extra:")]
    if extra:
        lines += ["## More plots", ""] + [f"![{k}]({v})" for k, v in extra] + [""]
    if "grid" in plots:
        lines += ["## Samples", "", "Label outlines in the class colours; findings outlined in yellow.", "",
                  f"![sample grid]({plots['grid']})", ""]
    enc = _mget(m, "encodings") or {}
    lines += ["## Files", "",
              "- `samples.parquet`: one row per sample (paths, sha256, split, spacing, requested and measured findings, "
              "QC, seeds, provenance)",
              "- `images/`, `labels/`, `instances/`: PNGs per sample"
              + (f" (image: {enc.get('image')}; label: {enc.get('label')})" if enc else ""),
              "- `manifest.json`: counts, code and library versions, the sha256 of every file",
              "", f"Load it with `store.DatasetStore().load(\"{name}@v{version}\")`; pin it with "
              f"`pairforge pull {name}@v{version} DEST`.", ""]
    wm = _mget(m, "watermark")
    if wm:
        lines += [f"Every image carries an invisible watermark ({_mget(wm, 'scheme')}); `pairforge verify IMAGE` names "
                  "the dataset, version and sample.", ""]
    lines += ["## Spec", "", "```yaml", str(_mget(m, "spec_text") or "").rstrip(), "```", ""]
    return "\n".join(lines)


def draw_plots(fs, base: str, rows: list[dict], domain) -> dict[str, Any]:
    """The card's plots of a version whose samples are under ``base`` (an fsspec filesystem path), from its index
    rows (``CARD_COLUMNS``, in sample order): writes ``card/*.png`` and returns ``{"plots": {key: file},
    "size_stats": {...}, "written": [files]}``, what ``card`` needs of them for README.md."""
    requested, measured = _findings(rows, "requested"), _findings(rows, "measured")
    plots: dict[str, str] = {}
    written: list[str] = []

    def put(key: str, fname: str, data: bytes | None) -> None:
        if data is None:
            return
        fs.makedirs(f"{base}/card", exist_ok=True)
        fs.pipe_file(f"{base}/card/{fname}", data)
        plots[key] = f"card/{fname}"
        written.append(f"card/{fname}")

    sizes_png, size_stats = plot_sizes(requested, measured)
    put("sizes", "finding_sizes.png", sizes_png)
    put("regions", "findings_per_region.png", plot_regions(region_counts(measured)))
    per_check, _ = qc_rates(rows)
    put("qc", "qc_pass_rates.png", plot_qc(per_check, [int((r.get("qc") or {}).get("attempts") or 1) for r in rows]))
    put("grid", "sample_grid.png", plot_grid(fs, base, rows, domain))
    # A domain's own plots: ``card_plots(rows, requested, measured) -> [(key, file name, PNG bytes or None)]``
    # from its hooks module, shown under "More plots".
    from schemas.domain import import_hook

    extra = import_hook(domain, domain.hooks_module, "card_plots") if domain is not None else None
    for key, fname, data in (extra(rows, requested, measured) if extra is not None else []):
        put(f"extra:{key}", fname, data)
    return {"plots": plots, "size_stats": size_stats, "written": written}


def staged_plots(staging: Any, domain: str | None) -> dict[str, Any]:
    """``draw_plots`` of a build's staged version (``store.build.BuildStaging``) before it is published: its rows
    from the shards' index parts (what publish writes as samples.parquet), its PNGs in the staging folder, which
    becomes the version. A build draws them in one of its idle workers while publish writes the rest."""
    rows = staging.index_table(CARD_COLUMNS).to_pylist()
    return draw_plots(staging.root.fs, staging.data_dir.rstrip("/"), rows, _domain(domain))


def card(version_dir: str, manifest: Any, storage_options: dict | None = None,
         plots: Callable[[], dict[str, Any]] | None = None) -> list[str]:
    """Write README.md and card/*.png into ``version_dir`` (local path or fsspec URL; ``storage_options``: the
    store's endpoint and keys for an object store). Returns the files written.
    ``plots``: returns ``draw_plots``'s result for this version, drawn meanwhile elsewhere (``staged_plots`` in a
    build's worker); called once the browser is written. If it raises, the plots are drawn here."""
    import pyarrow.parquet as pq

    fs, base = _fs(version_dir, storage_options)
    base = base.rstrip("/")
    with fs.open(f"{base}/samples.parquet", "rb") as f:
        table = pq.read_table(f, columns=CARD_COLUMNS)
    rows = table.to_pylist()
    requested, measured = _findings(rows, "requested"), _findings(rows, "measured")
    domain = _domain(_mget(manifest, "domain"))
    drawn = draw_plots(fs, base, rows, domain) if plots is None else None
    from flows.browser import write_browser  # index.html + sample.html: the static version browser

    browser = write_browser(fs, base, manifest, domain)
    if drawn is None:
        try:
            drawn = plots()
        except Exception as e:  # e.g. the worker drawing them died: draw them here
            import logging

            logging.getLogger("pairforge.card").warning("the card's plots drawn elsewhere failed (%s: %s); drawing "
                                                        "them here", type(e).__name__, e)
            drawn = draw_plots(fs, base, rows, domain)
    regions = region_counts(measured)
    per_check, per_split = qc_rates(rows)
    readme = render_readme(manifest, rows, requested, measured, drawn["plots"], drawn["size_stats"], regions,
                           per_check, per_split)
    # A domain's own statistics: ``card_text(rows, requested, measured) -> Markdown lines``, before "More plots".
    from schemas.domain import import_hook

    text = import_hook(domain, domain.hooks_module, "card_text") if domain is not None else None
    if text is not None:
        more = "## More plots"
        lines = "\n".join(text(rows, requested, measured)) + "\n"
        readme = readme.replace(more, lines + more, 1) if more in readme else readme.rstrip("\n") + "\n\n" + lines
    fs.pipe_file(f"{base}/README.md", readme.encode())
    return drawn["written"] + browser + ["README.md"]


__all__ = ["card", "draw_plots", "staged_plots", "render_readme", "qc_rates", "region_counts"]
