"""Render docs/gallery_chest_ct.png: slices at several levels in lung and mediastinal windows, with outlines.

    python bench/gallery_chest_ct.py [--out docs/gallery_chest_ct.png]

Row 1: lung window (C -600 / W 1500) with lobe outlines and findings (yellow). Row 2: mediastinal window
(C 40 / W 400), unannotated. Row 3: the label map in the class-table colours.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from annotators.overlay import closed_regions, instance_outline, outline, window  # noqa: E402
from flows.pipeline import make_sample  # noqa: E402
from schemas.classes import CT_CLASSES  # noqa: E402
from schemas.spec import validate_spec  # noqa: E402

LEVELS = [(0.15, "10mm lobulated solid nodule RUL"), (0.35, "8mm GGN LUL"), (0.55, "spiculated nodule 14mm RLL"),
          (0.75, "part-solid nodule 15 mm right middle lobe"), (0.92, "2 solid nodules 5-7 mm LLL")]
TILE = 256


def tile(rgb: np.ndarray, text: str) -> np.ndarray:
    t = cv2.resize(rgb, (TILE, TILE), interpolation=cv2.INTER_AREA)
    cv2.putText(t, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1, cv2.LINE_AA)
    return t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/gallery_chest_ct.png")
    args = ap.parse_args()
    cols = []
    for i, (level, text) in enumerate(LEVELS):
        spec = validate_spec({"name": "gallery", "samples": 1, "seed": 100 + i, "slice_level": level,
                              "image": {"spacing_mm": 0.7}, "findings": {"negatives": 0, "mixture": [text]}})
        s = make_sample(spec, 0)
        lobes = closed_regions(s.label, list(range(12, 22)))
        lobes[~np.isin(lobes, range(12, 17))] = 0
        lung = instance_outline(outline(window(s.image, -600, 1500), lobes, CT_CLASSES), s.instance)
        med = cv2.cvtColor(window(s.image, 40, 400), cv2.COLOR_GRAY2RGB)
        lut = np.zeros((256, 3), np.uint8)
        for k, c in CT_CLASSES.colors.items():
            lut[k] = c
        lab = lut[s.label]
        m = s.measured[0]
        cols.append(np.vstack([
            tile(lung, f"level {level:.2f}  lung window"),
            tile(med, f"{m['lobe']} {m['equivalent_diameter_mm']:.1f} mm ({m['kind']})"),
            tile(lab, "label map"),
        ]))
    grid = np.hstack(cols)
    Image.fromarray(grid).quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
