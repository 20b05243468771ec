"""Benchmark of the store's invisible watermark (scheme v3): exact-payload rates over a grid of geometric and lossy
attacks, distortion (max HU change / PSNR), encode and decode time. Writes the tables into docs/watermark.md
(between the bench markers).

    nice -n 15 python bench/bench_watermark.py --workers 2          # full grid, 6 images per cell (~20 min, 2 cores)
    python bench/bench_watermark.py --quick --no-write              # a few grid points, a quick look

Images are real pairforge samples (``flows.pipeline.make_samples``), marked as a published version marks them:
chest CT 16-bit HU+1024, attacked as its 8-bit lung-window copy (C -600, W 1500) — where the mark is weakest —
and surface-domain 8-bit grey images, each at 512x512 and 256x256. Every attack is applied with OpenCV as a user
would: resize (INTER_AREA down, INTER_LINEAR up), rotation about the centre on the same canvas (black corners), a
crop at an offset that varies per image, JPEG. A cell counts a copy as traced only if ``decode`` returns exactly
the embedded payload (sync threshold and 32-bit keyed check passed); decoding is blind and searches every scale in
0.45-2.2 and rotation in +-6 deg (no list of factors).
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from multiprocessing import Pool  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from store import codec  # noqa: E402
from store import watermark as wm  # noqa: E402

cv2.setNumThreads(1)

CT_SPEC = """
name: bench-ct
samples: 100000
image: {size: %d}
findings:
  negatives: 0.2
  mixture: ["4-8 mm solid nodule, any lobe", "8-20 mm ground-glass nodule, any lobe", "6-15 mm part-solid nodule, RLL"]
"""
SURFACE_SPEC = """
domain: surface
name: bench-surface
samples: 100000
image: {size: %d, color: grey}
defects: {negatives: 0.2, mixture: ["2-4 mm scratch on brushed aluminium", "1-2 mm pit on brushed aluminium"]}
"""


# ---------------------------------------------------------------- attacks (what users do to images)
def lung_window(u16: np.ndarray) -> np.ndarray:
    """16-bit HU+1024 -> 8-bit lung window (center -600, width 1500)."""
    hu = u16.astype(np.float32) - codec.HU_OFFSET
    return np.clip(np.rint((hu + 1350) / 1500 * 255), 0, 255).astype(np.uint8)


def jpeg(a: np.ndarray, q: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, int(q)])
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)


def resize(a: np.ndarray, s: float) -> np.ndarray:
    h, w = a.shape[:2]
    return cv2.resize(a, (max(1, int(round(w * s))), max(1, int(round(h * s)))),
                      interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)


def rotate(a: np.ndarray, deg: float) -> np.ndarray:
    h, w = a.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), float(deg), 1.0)
    return cv2.warpAffine(a, m, (w, h), flags=cv2.INTER_LINEAR)


def crop(a: np.ndarray, area: float, k: int) -> np.ndarray:
    """Keep ``area`` of the image (same aspect), at an offset that varies with k (deterministic)."""
    h, w = a.shape[:2]
    f = float(np.sqrt(area))
    ch, cw = max(8, int(round(h * f))), max(8, int(round(w * f)))
    dy, dx = (37 * k + 11) % (h - ch + 1), (53 * k + 5) % (w - cw + 1)
    return a[dy:dy + ch, dx:dx + cw]


def apply(a: np.ndarray, steps: tuple, k: int) -> np.ndarray:
    for op, v in steps:
        if op == "scale":
            a = resize(a, v)
        elif op == "rotate":
            a = rotate(a, v)
        elif op == "crop":
            a = crop(a, v, k)
        elif op == "jpeg":
            a = jpeg(a, v)
    return a


def grid(quick: bool) -> list[tuple[str, str, tuple]]:
    """(axis, label, steps) of every attack cell."""
    scales = [0.5, 0.65, 0.8, 1.15, 1.45, 2.0] if quick else [round(0.5 + 0.05 * i, 2) for i in range(31)]
    rots = [-5, -2, 3] if quick else list(range(-5, 6))
    crops = [0.5, 0.7] if quick else [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    jpegs = [50, 75] if quick else list(range(50, 100, 5))
    cells = [("scale", f"{s:.2f}", (("scale", s),)) for s in scales]
    cells += [("rotation", f"{r:+d}°", (("rotate", r),)) for r in rots]
    cells += [("crop", f"{int(round(c * 100))} %", (("crop", c),)) for c in crops]
    cells += [("jpeg", f"q{q}", (("jpeg", q),)) for q in jpegs]
    combos = [
        ("resize 0.7 + JPEG 70", (("scale", 0.7), ("jpeg", 70))),
        ("rotate 3° + crop 60 %", (("rotate", 3), ("crop", 0.6))),
        ("crop 50 % + JPEG 50", (("crop", 0.5), ("jpeg", 50))),
        ("resize 1.3 + rotate −2°", (("scale", 1.3), ("rotate", -2))),
        ("resize 0.6 + rotate 4° + JPEG 80", (("scale", 0.6), ("rotate", 4), ("jpeg", 80))),
        ("resize 1.55 + crop 70 % + JPEG 60", (("scale", 1.55), ("crop", 0.7), ("jpeg", 60))),
        ("rotate −5° + resize 0.85 + crop 50 % + JPEG 75", (("rotate", -5), ("scale", 0.85), ("crop", 0.5),
                                                           ("jpeg", 75))),
    ]
    cells += [("combination", name, steps) for name, steps in combos[:3 if quick else None]]
    return cells


GROUPS = ("CT lung window 512²", "surface 8-bit 512²", "CT lung window 256²", "surface 8-bit 256²")


CACHE_KEYS = {"CT lung window 512²": "ct512", "surface 8-bit 512²": "sf512", "CT lung window 256²": "ct256",
              "surface 8-bit 256²": "sf256"}


def hosts(n: int, cache: str | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """cache key -> (stored hosts before the mark, instance maps): rendered, or read from / written to ``cache``
    (an .npz; rendering is the slow part on a busy machine)."""
    if cache and os.path.exists(cache):
        d = np.load(cache)
        return {k: (d[k][:n], d[k + "_inst"][:n]) for k in CACHE_KEYS.values()}
    from flows.pipeline import make_samples
    from schemas.spec import load_spec_text

    out = {}
    for g, key in CACHE_KEYS.items():
        size = 512 if "512" in g else 256
        ct = g.startswith("CT")
        spec = load_spec_text((CT_SPEC if ct else SURFACE_SPEC) % size)
        samples = make_samples(spec, range(1000, 1000 + n))
        out[key] = (np.stack([codec.hu_to_stored(s.image) if ct else s.image for s in samples]),
                    np.stack([s.instance for s in samples]))
    if cache:
        np.savez_compressed(cache, **{k: v[0] for k, v in out.items()}, **{k + "_inst": v[1] for k, v in out.items()})
    return out


def images(n: int, cache: str | None = None) -> dict[str, list[tuple[np.ndarray, np.ndarray, wm.Payload, np.ndarray]]]:
    """group -> [(published copy as attacked: 8-bit, host before the mark (stored), payload, marked stored)]."""
    hs = hosts(n, cache)
    out = {}
    for g, key in CACHE_KEYS.items():
        ct = g.startswith("CT")
        rows = []
        for k, (host, inst) in enumerate(zip(*hs[key])):
            p = wm.payload_for(f"bench-{g}", 7, 1000 + k)
            marked = wm.embed(host, p, wm.keep_out_mask(inst))
            rows.append((lung_window(marked) if ct else marked, host, p, marked))
        out[g] = rows
    return out


def _task(args):
    gi, k, steps, img, payload_value = args
    cv2.setNumThreads(1)
    a = apply(img, steps, k)
    t0 = time.perf_counter()
    det = wm.decode(a)
    dt = time.perf_counter() - t0
    return gi, bool(det.found and det.payload is not None and det.payload.value == payload_value), dt, det.attempts


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak ** 2 / mse)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=6, help="images per group (each gets every attack)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a few grid points only")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/watermark.md alone")
    ap.add_argument("--cache", help="an .npz of the rendered hosts: read if it exists, else written")
    ap.add_argument("--axes", default="scale,rotation,crop,jpeg,combination", help="comma-separated grid axes to run")
    args = ap.parse_args(argv)
    t_all = time.perf_counter()
    print(f"generating {args.images} images per group ...", flush=True)
    imgs = images(args.images, args.cache)
    cells = [c for c in grid(args.quick) if c[0] in args.axes.split(",")]
    tasks, index = [], []
    for ci, (_, _, steps) in enumerate(cells):
        for gi, g in enumerate(GROUPS):
            for k, (img, _, p, _) in enumerate(imgs[g]):
                tasks.append((gi, k, steps, img, p.value))
                index.append(ci)
    print(f"{len(cells)} cells x {len(GROUPS)} groups x {args.images} images = {len(tasks)} decodes", flush=True)
    hits = np.zeros((len(cells), len(GROUPS)), int)
    total = np.zeros((len(cells), len(GROUPS)), int)
    dec_ms, reads = [], []
    with Pool(args.workers) as pool:
        for n_done, (ci, (gi, ok, dt, att)) in enumerate(zip(index, pool.imap(_task, tasks, chunksize=4))):
            hits[ci, gi] += ok
            total[ci, gi] += 1
            dec_ms.append(dt * 1e3)
            reads.append(att)
            if n_done + 1 == len(tasks) or index[n_done + 1] != ci:  # a cell is complete: print its row
                print(f"  {cells[ci][0]} {cells[ci][1]}: " + ", ".join(f"{hits[ci, g]}/{total[ci, g]}" for g in
                                                                     range(len(GROUPS))) +
                      f"  ({n_done + 1}/{len(tasks)} decodes, {time.perf_counter() - t_all:.0f} s)", flush=True)

    # distortion and encode time (512², one core)
    ct = imgs["CT lung window 512²"]
    sf = imgs["surface 8-bit 512²"]
    ct_max = max(int(np.abs(m.astype(np.int32) - h.astype(np.int32)).max()) for _, h, _, m in ct)
    ct_psnr = [psnr(lung_window(h), lung_window(m)) for _, h, _, m in ct]
    ct_rms = [float(np.sqrt(np.mean((m.astype(np.float64) - h) ** 2))) for _, h, _, m in ct]
    sf_max = max(int(np.abs(m.astype(np.int32) - h.astype(np.int32)).max()) for _, h, _, m in sf)
    sf_psnr = [psnr(h, m) for _, h, _, m in sf]
    enc = []
    for k in range(30):
        _, h, _, _ = ct[k % len(ct)]
        t0 = time.perf_counter()
        wm.embed(h, wm.payload_for("enc", 1, k), None)
        enc.append((time.perf_counter() - t0) * 1e3)

    lines = ["| axis | attack | " + " | ".join(GROUPS) + " |", "| --- | --- |" + " ---: |" * len(GROUPS)]
    for ci, (axis, label, _) in enumerate(cells):
        lines.append(f"| {axis} | {label} | " + " | ".join(f"{hits[ci, gi]}/{total[ci, gi]}" for gi in
                                                            range(len(GROUPS))) + " |")
    summary = ["", "| overall exact-payload rate per group | " + " | ".join(GROUPS) + " |",
               "| --- |" + " ---: |" * len(GROUPS),
               "| all cells | " + " | ".join(f"{100 * hits[:, gi].sum() / max(1, total[:, gi].sum()):.1f} %"
                                           for gi in range(len(GROUPS))) + " |"]
    summary += [
        "",
        "| distortion and speed | value |",
        "| --- | ---: |",
        f"| CT: max change of any pixel (bound {wm.CT_AMPLITUDE_HU} HU) | {ct_max} HU |",
        f"| CT: RMS change, HU (median) | {np.median(ct_rms):.2f} HU |",
        f"| CT: PSNR in the 8-bit lung window, median / min | {np.median(ct_psnr):.1f} / {min(ct_psnr):.1f} dB |",
        f"| 8-bit grey: max change (bound {wm.U8_AMPLITUDE}) / PSNR median / min | {sf_max} / "
        f"{np.median(sf_psnr):.2f} / {min(sf_psnr):.2f} dB |",
        f"| encode 512² (embed, cached tile), median / p95 | {np.median(enc):.2f} / {np.percentile(enc, 95):.2f} ms |",
        f"| decode (any attack, search included), median / p95 | {np.median(dec_ms):.0f} / "
        f"{np.percentile(dec_ms, 95):.0f} ms |",
        f"| payload reads per decode, median / max (bound {wm.MAX_READS}) | {int(np.median(reads))} / {max(reads)} |",
    ]
    env = (f"Measured {time.strftime('%Y-%m-%d', time.gmtime())} on {platform.machine()} "
           f"({os.cpu_count()} cores shared with other jobs, {args.workers} worker processes, one thread each), "
           f"numpy {np.__version__}, OpenCV {cv2.__version__}; {args.images} images per cell and group; "
           f"{len(tasks)} decodes; run time {time.perf_counter() - t_all:.0f} s. Command: "
           f"`nice -n 15 python bench/bench_watermark.py --images {args.images} --workers {args.workers}"
           f"{' --quick' if args.quick else ''}{' --cache ' + args.cache if args.cache else ''}"
           f"{' --axes ' + args.axes if args.axes != ap.get_default('axes') else ''}`.")
    block = "\n".join([env, ""] + lines + summary)
    print(block)
    if not args.no_write:
        doc = ROOT / "docs" / "watermark.md"
        text = doc.read_text(encoding="utf-8")
        new = re.sub(r"<!-- bench:start -->.*<!-- bench:end -->",
                     lambda _: f"<!-- bench:start -->\n{block}\n<!-- bench:end -->", text, flags=re.S)
        doc.write_text(new, encoding="utf-8")
        print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
