"""docs/gallery_insertion.png: the real CT_small slice before and after NPS-matched insertion of nodules of several
kinds and sizes (lung window; outlines on a third copy), and real texture photographs with inserted defects.

    python bench/gallery_insertion.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scan_fixtures import ct_small_hu  # noqa: E402
from generators.ct_insert import insert_intensities, place_findings, scan_context  # noqa: E402

ROW = [("solid", 6.0, "smooth"), ("ground_glass", 7.0, "smooth"), ("part_solid", 7.0, "lobulated"),
       ("solid", 4.0, "spiculated")]


def lung_window(hu: np.ndarray) -> np.ndarray:
    return (np.clip((hu + 1150) / 1500, 0, 1) * 255).astype(np.uint8)


def ct_rows(scale: int = 3) -> list[np.ndarray]:
    hu, sp = ct_small_hu()
    ctx = scan_context(hu, sp)
    rows = []
    for seed, group in enumerate([ROW[:2], ROW[2:]]):
        rng = np.random.default_rng(seed + 11)
        fs = [{"kind": k, "diameter_mm": d, "location": "any", "margin": m, "juxtapleural": False} for k, d, m in group]
        label, inst = ctx["label"].copy(), np.zeros(hu.shape, np.uint16)
        placed = place_findings(ctx["region"], ctx["vessels"], fs, sp, rng, label, inst)
        img, _ = insert_intensities(hu, ctx["clean"], placed, sp, ctx["noise"], rng, "matched", ctx["psf_sigma_px"])
        before, after = lung_window(hu), lung_window(img)
        up = lambda a: cv2.resize(a, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)  # noqa: E731
        b, a = cv2.cvtColor(up(before), cv2.COLOR_GRAY2BGR), cv2.cvtColor(up(after), cv2.COLOR_GRAY2BGR)
        o = a.copy()
        for f in placed:
            m = cv2.resize((inst == f["instance"]).astype(np.uint8), None, fx=scale, fy=scale,
                           interpolation=cv2.INTER_NEAREST)
            cs, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(o, cs, -1, (0, 255, 255) if f["kind"] == "solid" else (255, 255, 0), 1)
            x, y = int(f["center_px"][0] * scale), int(f["center_px"][1] * scale)
            cv2.putText(o, f"{f['kind'].replace('_', '-')} {f['diameter_mm']:g}mm", (max(2, x - 60), min(o.shape[0] - 4, y + 40)),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1, cv2.LINE_AA)
        rows.append(np.hstack([b, a, o]))
    return rows


def photo_row(width: int) -> np.ndarray | None:
    """Texture photographs (skimage) with defects drawn by the surface domain's photo support."""
    try:
        import skimage.data as sd

        from flows.pipeline import make_samples
        from schemas.spec import validate_spec
    except ImportError:
        return None
    d = Path(tempfile.mkdtemp())
    for name in ("brick", "gravel", "grass"):
        cv2.imwrite(str(d / f"{name}.png"), getattr(sd, name)())
    spec = validate_spec({"name": "g", "domain": "surface", "samples": 3, "seed": 2, "material": "image",
                          "photos": {"folder": str(d), "foreground": "none"},
                          "image": {"size": 512}, "field_of_view_mm": 25,
                          "defects": {"negatives": 0, "mixture": ["4 mm stain", "10 mm scratch", "2 mm pit"]}})
    tiles = []
    for s in make_samples(spec, range(3)):
        img = s.image if s.image.ndim == 3 else cv2.cvtColor(s.image, cv2.COLOR_GRAY2BGR)
        o = img.copy()
        cs, _ = cv2.findContours((s.instance > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(o, cs, -1, (0, 255, 255), 1)
        tiles.append(np.hstack([img, o]))
    row = np.hstack(tiles)
    return cv2.resize(row, (width, int(row.shape[0] * width / row.shape[1])), interpolation=cv2.INTER_AREA)


def main() -> None:
    rows = ct_rows()
    w = rows[0].shape[1]
    pr = photo_row(w)
    if pr is not None:
        rows.append(pr)
    out = np.vstack(rows)
    Path("docs").mkdir(exist_ok=True)
    cv2.imwrite("docs/gallery_insertion.png", out, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print("docs/gallery_insertion.png", out.shape)


if __name__ == "__main__":
    main()
