"""`pairforge parse` and `pairforge preview`: look at a spec's samples without building a dataset version."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from annotators.overlay import closed_regions, instance_outline, outline, window
from flows.pipeline import make_samples
from schemas.classes import CT_CLASSES
from schemas.errors import SpecError
from schemas.shorthand import parse_finding
from schemas.spec import BaseSpec, load_spec, normalised_spec, spec_hash, validate_spec

_SURFACE_WORDS = re.compile(r"\b(scratch|scratches|crack|cracks|dent|dents|pit|pits|stain|stains|hole|holes|particle|"
                            r"particles|contamination|chip|chipped|missing material)\b", re.I)


def parse_text(text: str) -> dict[str, Any]:
    """Normalise one shorthand finding (chest-CT nodule or surface defect) to a JSON-ready dict.

    Text naming a surface defect (scratch, crack, dent, pit, stain, hole, particle, chip) is read as one,
    with the material it names; anything else as a pulmonary nodule."""
    if text and _SURFACE_WORDS.search(text):
        from schemas.surface_shorthand import parse_defect_text

        defect, material = parse_defect_text(text)
        return {"domain": "surface", "finding": defect.model_dump(mode="json"), "material": material}
    return {"domain": "chest_ct", "finding": parse_finding(text).model_dump(mode="json")}


def spec_from_source(source: str, n: int, seed: int | None) -> BaseSpec:
    """A spec file, or one shorthand finding turned into a small all-positive spec."""
    p = Path(source)
    looks_like_file = p.suffix.lower() in {".yaml", ".yml", ".json"}
    if p.exists() or looks_like_file:
        spec = load_spec(p)
        data = spec.model_dump(mode="json")
        data["samples"] = n
        if seed is not None:
            data["seed"] = seed
        return validate_spec(data)
    parsed = parse_text(source)
    if parsed["domain"] == "surface":
        finding = {k: v for k, v in parsed["finding"].items() if v is not None}
        return validate_spec({"name": "preview", "domain": "surface", "samples": n, "seed": seed or 0,
                              "material": parsed["material"] or "brushed_metal",
                              "defects": {"negatives": 0.0, "mixture": [finding]}})
    return validate_spec({"name": "preview", "domain": "chest_ct", "samples": n, "seed": seed or 0,
                          "findings": {"negatives": 0.0, "mixture": [parsed["finding"]]}})


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


PREVIEW_SUFFIXES = ("_image.png", "_label.png", "_overlay.png", ".json")


def run_preview(source: str, out_dir: str | Path, n: int = 4, seed: int | None = None,
                overwrite: bool = False) -> list[Path]:
    """Generate n samples of a spec (or shorthand text) and write image, label, overlay and JSON per sample.
    Files of an earlier preview in ``out_dir`` are kept (SpecError) unless ``overwrite``."""
    if n < 1:
        raise SpecError(f"-n must be at least 1, not {n}")
    spec = spec_from_source(source, n, seed)
    out = Path(out_dir)
    from schemas.plan import sample_id

    taken = [out / f"{sample_id(i)}{suf}" for i in range(n) for suf in PREVIEW_SUFFIXES
             if (out / f"{sample_id(i)}{suf}").exists()]
    if taken and not overwrite:
        raise SpecError(f"{str(out)!r} already holds {len(taken)} files of an earlier preview (e.g. {taken[0].name}); "
                        "pass --overwrite to replace them, or choose another --out folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SpecError(f"cannot create output folder {str(out)!r}: {e.strerror}") from None
    digest = spec_hash(spec)
    samples = make_samples(spec, range(n), digest=digest)
    table = CT_CLASSES
    if spec.domain != "chest_ct":
        from schemas import surface

        table = surface.SURFACE_CLASSES
    written = []
    for s in samples:
        base = out / s.sample_id
        if spec.domain == "chest_ct":
            img16 = np.clip(np.rint(s.image + 1024), 0, 65535).astype(np.uint16)
            cv2.imwrite(f"{base}_image.png", img16)
            lobe_view = closed_regions(s.label, list(range(12, 17)) + [17, 18, 19, 20, 21])
            lobe_view[~np.isin(lobe_view, range(12, 17))] = 0
            view = outline(window(s.image, -600, 1500), lobe_view, table)
            view = instance_outline(view, s.instance)
        else:
            img = s.image
            cv2.imwrite(f"{base}_image.png", img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            view = instance_outline(img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2RGB), s.instance,
                                    color=(255, 40, 40))
        cv2.imwrite(f"{base}_label.png", s.label)
        cv2.imwrite(f"{base}_overlay.png", cv2.cvtColor(view, cv2.COLOR_RGB2BGR))
        meta = {
            "sample_id": s.sample_id, "split": s.split, "domain": s.domain, "pixel_spacing_mm": s.spacing_mm,
            "image_encoding": "uint16 PNG of HU + 1024" if s.domain == "chest_ct" else "uint8 PNG",
            "class_table": table.as_dict(), "requested": s.requested, "measured": s.measured, "bboxes": s.bboxes,
            "qc": s.qc, "seed": s.seed, "generator": s.generator, "params": s.params,
            "spec": normalised_spec(spec), "spec_hash": digest,
        }
        Path(f"{base}.json").write_text(json.dumps(meta, indent=1, default=_json_default))
        written += [Path(f"{base}{suf}") for suf in ("_image.png", "_label.png", "_overlay.png", ".json")]
    return written
