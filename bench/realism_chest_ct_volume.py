"""Realism against the real chest-CT slice pydicom ships (CT_small.dcm, 0.66 mm, 5 mm thick).

Measures, on the real slice, on 8 slices of the 2D phantom and on 8 slices of 3D phantom volumes, all at
0.66 mm in-plane (the volumes also 5 mm thick; the 2D phantom's earlier values are printed as recorded), on 128 x 128 crops of the same region (vertebra, posterior
lungs, paraspinal muscle): lung parenchyma 5th/95th percentile (lung = below -600 HU, eroded by 1 px), share of
the lung region (the < -600 HU mask closed with a 9 px disc, eroded 2 px) above -500 HU (vessels), noise in
uniform soft tissue (std of the image minus its sigma = 2 px Gaussian blur, inside paraspinal muscle). Writes docs/realism.png (real | 2D phantom | volume
crops of the same region, same window) and prints the table.

    python bench/realism_chest_ct_volume.py [--slices 8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

SP = 0.661468
CROP = 128


def stats(img: np.ndarray, muscle: np.ndarray) -> dict[str, float]:
    raw = (img < -600).astype(np.uint8)
    lung = cv2.erode(raw, np.ones((3, 3), np.uint8)) > 0  # parenchyma without the partial-volume rim
    region = cv2.morphologyEx(raw, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9)))
    region = cv2.erode(region, np.ones((5, 5), np.uint8)) > 0  # lung region with its vessels, off the pleura
    vals = img[lung]
    hp = img - cv2.GaussianBlur(img.astype(np.float32), (0, 0), 2.0)
    return {"p5": float(np.percentile(vals, 5)), "p95": float(np.percentile(vals, 95)),
            "above500": float((img[region] > -500).mean() * 100) if region.any() else float("nan"),
            "noise": float(hp[muscle].std()) if muscle.any() else float("nan")}


def real_slice():
    import pydicom
    from pydicom.data import get_testdata_file

    d = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    a = d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept)
    # paraspinal muscle of this slice: the band below the spinous process, away from fat planes
    m = np.zeros(a.shape, bool)
    m[98:118, 18:48] = True
    m[98:118, 80:110] = True
    m &= (a > 0) & (a < 100)
    return a, m


def crop_at_vertebra(img, label, canal_id, muscle_id):
    ys, xs = np.nonzero(label == canal_id)
    cy, cx = int(ys.mean()), int(xs.mean())
    # the real crop shows the vertebral body in its upper half, the spinous process low
    y0, x0 = max(0, cy - 58), max(0, cx - CROP // 2)
    c = img[y0:y0 + CROP, x0:x0 + CROP]
    lab = label[y0:y0 + CROP, x0:x0 + CROP]
    mus = cv2.erode((lab == muscle_id).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    return c, lab, mus


def old_phantom(n):
    from flows.pipeline import make_samples
    from schemas.classes import CT_IDS
    from schemas.spec import load_spec, validate_spec

    data = load_spec(ROOT / "examples/chest_ct_nodules.yaml").model_dump(mode="json")
    data["image"] = {"size": 512, "spacing_mm": SP}
    data["slice_level"] = [0.35, 0.65]
    data["findings"] = {"negatives": 1.0, "mixture": []}
    data["samples"] = n
    spec = validate_spec(data)
    out = []
    for s in make_samples(spec, range(n)):
        out.append(crop_at_vertebra(s.image, s.label, CT_IDS["spinal_canal"], CT_IDS["muscle"]))
    return out


def new_phantom(n):
    from generators.volume_pipeline import VolumeRequest, layout_volume, render_volume_request
    from schemas.volume import VOLUME_IDS

    out = []
    per = 2
    for v in range((n + per - 1) // per):
        rng = np.random.default_rng(1000 + v)
        req = VolumeRequest((24, 512, 512), (5.0, SP, SP), 0.5)
        lay = layout_volume(req, rng)
        img, _ = render_volume_request(lay, rng)
        for k in (8, 14)[:per]:
            out.append(crop_at_vertebra(img[k].astype(np.float32), lay["label"][k], VOLUME_IDS["spinal_canal"],
                                        VOLUME_IDS["muscle"]))
    return out[:n]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "docs/realism.png"))
    args = ap.parse_args()
    real, rm = real_slice()
    rows = {"real CT_small slice": stats(real, rm)}
    olds = old_phantom(args.slices)
    news = new_phantom(args.slices)
    # The 2D phantom before it shared the volume phantom's models, as this script measured it then (recorded).
    rows["2D phantom (before, recorded)"] = {"p5": -969.0, "p95": -809.0, "above500": 2.3, "noise": 15.4}
    for name, items in (("2D phantom (now)", olds), ("3D volume phantom", news)):
        ss = [stats(c, m) for c, _, m in items]
        rows[name] = {k: float(np.nanmean([s[k] for s in ss])) for k in ss[0]}
    print("| measure | " + " | ".join(rows) + " |")
    print("| --- |" + " --- |" * len(rows))
    print("| lung 5th / 95th percentile (HU) | " + " | ".join(f"{r['p5']:.0f} / {r['p95']:.0f}" for r in rows.values()) + " |")
    print("| lung pixels above -500 HU (%) | " + " | ".join(f"{r['above500']:.1f}" for r in rows.values()) + " |")
    print("| noise in paraspinal muscle (HU) | " + " | ".join(f"{r['noise']:.1f}" for r in rows.values()) + " |")

    def win(a, c, w):
        return (np.clip((a - (c - w / 2)) / w, 0, 1) * 255).astype(np.uint8)

    tiles = []
    for c, w in ((-600, 1500), (40, 400)):
        row = [win(real, c, w), win(olds[0][0], c, w), win(olds[1][0], c, w), win(news[0][0], c, w), win(news[1][0], c, w)]
        tiles.append(np.concatenate([cv2.resize(t, (256, 256), interpolation=cv2.INTER_NEAREST) for t in row], 1))
    img = np.concatenate(tiles, 0)
    img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    for i, t in enumerate(["real CT_small", "2D phantom (now)", "", "3D volume", ""]):
        cv2.putText(img, t, (i * 256 + 6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 255, 255), 1, cv2.LINE_AA)
    cv2.imwrite(args.out, img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
