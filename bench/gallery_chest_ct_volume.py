"""docs/gallery_chest_ct_volume.png: axial, coronal and sagittal planes through a finding of several volumes
(lung window; lobe outlines in colour, findings in yellow), plus one mediastinal-window axial slice each.

    python bench/gallery_chest_ct_volume.py [--volumes 3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from flows.volume import make_volume  # noqa: E402
from generators.volume_pipeline import VolumeRequest  # noqa: E402
from schemas.volume import VOLUME_CLASSES  # noqa: E402

SETS = [
    [{"kind": "solid", "diameter_mm": 9.0, "location": "RUL", "margin": "spiculated"}],
    [{"kind": "part_solid", "diameter_mm": 18.0, "location": "LLL", "margin": "lobulated"}],
    [{"kind": "ground_glass", "diameter_mm": 14.0, "location": "RLL", "margin": "smooth"},
     {"kind": "solid", "diameter_mm": 6.0, "location": "LUL", "juxtapleural": True}],
]


def window(a, c, w):
    return (np.clip((a.astype(np.float32) - (c - w / 2)) / w, 0, 1) * 255).astype(np.uint8)


def outline(rgb, lab, ids, color):
    m = np.isin(lab, ids).astype(np.uint8)
    cs, _ = cv2.findContours(m, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(rgb, cs, -1, color, 1)


def panel(img2d, lab2d, lob2d, scale_rows, size=256, c=-600, w=1500, lobes=True):
    h, wd = img2d.shape
    nh = int(round(h * scale_rows))
    g = cv2.resize(window(img2d, c, w), (wd, nh), interpolation=cv2.INTER_LINEAR)
    lb = cv2.resize(lab2d, (wd, nh), interpolation=cv2.INTER_NEAREST)
    lo = cv2.resize(lob2d, (wd, nh), interpolation=cv2.INTER_NEAREST)
    rgb = cv2.cvtColor(g, cv2.COLOR_GRAY2RGB)
    if lobes:
        for k in range(12, 17):
            col = tuple(int(v) for v in VOLUME_CLASSES.colors[k])
            m = (lo == k).astype(np.uint8)
            cs, _ = cv2.findContours(m, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(rgb, cs, -1, col, 1)
    outline(rgb, lb, [20, 21], (255, 255, 0))
    s = size / max(rgb.shape[:2])
    rgb = cv2.resize(rgb, (int(rgb.shape[1] * s), int(rgb.shape[0] * s)), interpolation=cv2.INTER_AREA)
    out = np.zeros((size, size, 3), np.uint8)
    y0, x0 = (size - rgb.shape[0]) // 2, (size - rgb.shape[1]) // 2
    out[y0:y0 + rgb.shape[0], x0:x0 + rgb.shape[1]] = rgb
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--volumes", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs/gallery_chest_ct_volume.png"))
    args = ap.parse_args()
    rows = []
    for v in range(args.volumes):
        req = VolumeRequest((128, 512, 512), (2.5, 0.7, 0.7), 0.5, SETS[v % len(SETS)])
        vol = make_volume(req, seed=2026, index=v)
        img, lab = vol["image"], vol["label"]
        lob = vol["lobes"]  # lobe id under every lung voxel (vessels, airways and findings included)
        m = vol["measured"][0]
        i, j, k = (int(round(x)) for x in m["centroid_ijk"])
        sz, sy, sx = vol["geometry"].spacing
        r = sz / sx
        tiles = [panel(img[k], lab[k], lob[k], 1.0), panel(img[:, j, :], lab[:, j, :], lob[:, j, :], r),
                 panel(img[:, :, i], lab[:, :, i], lob[:, :, i], r),
                 panel(img[min(k + 12, img.shape[0] - 1)], lab[min(k + 12, img.shape[0] - 1)], lob[0], 1.0, c=40, w=400,
                       lobes=False)]
        txt = f"{m['kind']} {m['equivalent_diameter_mm']:.1f} mm eq. ({m['lobe']}), Lung-RADS {m['lung_rads']}"
        cv2.putText(tiles[0], txt, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 0), 1, cv2.LINE_AA)
        for t, name in zip(tiles, ["axial", "coronal", "sagittal", "axial, mediastinal window"]):
            cv2.putText(t, name, (4, 250), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (200, 200, 200), 1, cv2.LINE_AA)
        rows.append(np.concatenate(tiles, 1))
        print(f"volume {v}: {txt}; qc passed {vol['qc']['passed']}", flush=True)
    out = np.concatenate(rows, 0)
    from PIL import Image

    # a 96-colour adaptive palette keeps the file small (the grey ramp plus the outline colours)
    Image.fromarray(out).quantize(colors=96, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        args.out, optimize=True)
    print("wrote", args.out, Path(args.out).stat().st_size // 1024, "KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
