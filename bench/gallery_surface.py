"""Render docs/gallery_surface.png: materials (rows) x defects (columns), each tile a crop around the defect with
the mask outline in red. The last row is material ``image`` on a synthetic "photo" of a good part.

    .venv/bin/python bench/gallery_surface.py [--out docs/gallery_surface.png]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.pipeline import make_samples  # noqa: E402
from schemas.spec import validate_spec  # noqa: E402

MATERIALS = ["brushed_metal", "cast_metal", "painted", "plastic", "wood", "textile"]
DEFECTS = {
    "scratch": "scratch 8-12 mm 0.15-0.3 mm wide",
    "crack": "crack 10-14 mm 0.15-0.3 mm wide",
    "dent": "dent 4-6 mm 0.2-0.4 mm deep",
    "pit": "2 pits 0.8-1.2 mm",
    "stain": "stain 5-7 mm",
    "hole": "hole 2-3 mm",
    "particle": "particle 1-1.5 mm",
    "missing_material": "chipped edge 5-7 mm, top edge",
}
TILE = 128
SRC_MM = 14.0  # each tile shows 14 mm of surface


def synthetic_photo_folder(folder: Path, size: int = 512) -> None:
    """A stand-in for a user's photo: a turned metal disc on a dark table, 2 photos."""
    rng = np.random.default_rng(7)
    for i in range(2):
        img = np.full((size, size, 3), 25, np.float32)
        yy, xx = np.mgrid[:size, :size]
        r = np.hypot(yy - size / 2, xx - size / 2)
        disc = r < size * 0.42
        rings = 150 + 25 * np.sin(r / 3.0) * np.exp(-((r % 37) / 40)) + rng.normal(0, 4, (size, size))
        shade = 1 - 0.3 * (xx / size)
        for c, tint in enumerate((1.0, 0.98, 0.95)):
            img[..., c][disc] = (rings * shade * tint)[disc]
        cv2.imwrite(str(folder / f"part_{i}.png"), np.clip(img, 0, 255).astype(np.uint8))


def _spec(material: str, text: str, photos: Path | None = None) -> dict:
    d = {"domain": "surface", "name": "gallery", "samples": 1, "material": material,
         "field_of_view_mm": [40, 40], "image": {"size": 512, "color": "rgb"},
         "defects": {"negatives": 0, "mixture": [text]}}
    if photos is not None:
        d["photos"] = {"folder": str(photos)}
    return d


def tile_for(sample) -> np.ndarray:
    img = sample.image if sample.image.ndim == 3 else np.repeat(sample.image[..., None], 3, 2)
    h, w = sample.label.shape
    src = int(round(SRC_MM / sample.spacing_mm))
    ys, xs = np.nonzero(sample.instance)
    if len(ys):
        cy, cx = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2
        src = max(src, int(ys.max() - ys.min()) + 8, int(xs.max() - xs.min()) + 8)
    else:
        cy, cx = h // 2, w // 2
    src = min(src, h, w)
    y0 = int(np.clip(cy - src // 2, 0, h - src))
    x0 = int(np.clip(cx - src // 2, 0, w - src))
    crop = img[y0:y0 + src, x0:x0 + src]
    m = (sample.instance[y0:y0 + src, x0:x0 + src] > 0).astype(np.uint8)
    big = 4 * TILE
    view = cv2.resize(crop, (big, big), interpolation=cv2.INTER_AREA if src > big else cv2.INTER_LINEAR)
    mbig = cv2.resize(m, (big, big), interpolation=cv2.INTER_NEAREST)  # labels: nearest only
    # outline drawn just outside the mask (two tile pixels) so thin defects stay visible inside it
    mbig = cv2.dilate(mbig, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (17, 17)))
    contours, _ = cv2.findContours(mbig, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = cv2.resize(view, (TILE, TILE), interpolation=cv2.INTER_AREA)
    scaled = [np.round(c.astype(np.float32) * TILE / big).astype(np.int32) for c in contours]
    cv2.drawContours(out, scaled, -1, (255, 40, 40), 1, cv2.LINE_AA)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "gallery_surface.png"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp)
        synthetic_photo_folder(photos)
        for material in MATERIALS + ["image"]:
            tiles = []
            for kind, text in DEFECTS.items():
                if material == "image" and kind == "missing_material":
                    tiles.append(np.full((TILE, TILE, 3), 255, np.uint8))
                    continue
                spec = validate_spec(_spec(material, text, photos if material == "image" else None))
                tiles.append(tile_for(make_samples(spec, [3])[0]))
            rows.append(np.concatenate(tiles, 1))
    grid = np.concatenate(rows, 0)
    lw, th = 118, 18
    canvas = Image.new("RGB", (grid.shape[1] + lw, grid.shape[0] + th), "white")
    canvas.paste(Image.fromarray(grid), (lw, th))
    d = ImageDraw.Draw(canvas)
    for j, kind in enumerate(DEFECTS):
        d.text((lw + j * TILE + 4, 3), kind.replace("missing_material", "chipped edge"), fill="black")
    for i, material in enumerate(MATERIALS + ["image (photo)"]):
        d.text((4, th + i * TILE + TILE // 2 - 6), material, fill="black")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB, {canvas.size[0]}x{canvas.size[1]})")


if __name__ == "__main__":
    main()
