"""`pairforge parse` and `pairforge preview`: look at a spec's samples without building a dataset version."""
from __future__ import annotations

import inspect
import os
import json
from pathlib import Path
from typing import Any

import numpy as np

from annotators.overlay import display, instance_outline
from flows.pipeline import make_samples
from schemas.domain import all_domains, default_domain, get_domain, import_hook
from schemas.errors import SpecError
from schemas.spec import BaseSpec, load_spec, normalised_spec, spec_hash, validate_spec
from store import codec as png
from store.codecs import codec_for_domain


def parse_text(text: str) -> dict[str, Any]:
    """Normalise one shorthand finding to a JSON-ready dict ``{"domain", "finding", ...}``.

    The first domain whose description claims the text (e.g. a surface-defect word) reads it; any other text is
    read by the default domain's parser (a pulmonary nodule)."""
    for d in all_domains():
        if d.parse_finding is not None and d.claims_text is not None and d.claims_text(text or ""):
            return {"domain": d.name, **d.parse_finding(text)}
    d = get_domain(default_domain())
    if d.parse_finding is None:
        raise SpecError(f"no shorthand parser reads {text!r}; write a spec file instead")
    return {"domain": d.name, **d.parse_finding(text)}


def spec_from_source(source: str, n: int, seed: int | None) -> BaseSpec:
    """A spec file, or one shorthand finding turned into a small all-positive spec."""
    p = Path(source)
    looks_like_file = p.suffix.lower() in {".yaml", ".yml", ".json"}
    if os.path.exists(source) or looks_like_file:  # os.path: False (not OSError) for a name too long to be a file
        spec = load_spec(p)
        data = spec.model_dump(mode="json")
        data["samples"] = n
        if seed is not None:
            data["seed"] = seed
        return validate_spec(data)
    parsed = parse_text(source)
    d = get_domain(parsed["domain"])
    if d.one_finding_spec is None:
        raise SpecError(f"domain {d.name!r} cannot preview a single finding; write a spec file instead")
    return validate_spec({"name": "preview", "domain": d.name, "samples": n, "seed": seed or 0,
                          **d.one_finding_spec(parsed, n, seed or 0)})


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
    from schemas.memory import check_memory

    check_memory(spec.model_copy(update={"shard_size": n}), what=f"previewing {n} sample(s)")  # all n made at once
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
    domain = get_domain(spec.domain)
    table = domain.classes
    codec = codec_for_domain(spec.domain)
    overlay = import_hook(domain, domain.hooks_module, "preview_overlay")
    written = []
    for s in samples:
        base = out / s.sample_id
        stored = codec.encode(np.asarray(s.image))
        context = codec.sample_context(s)  # {} for PNG codecs; e.g. a volume's affine
        Path(f"{base}_image{codec.suffix}").write_bytes(codec.to_bytes(stored, text=context or None))
        if overlay is not None:
            # A hook that takes ``sample`` gets the whole sample too (e.g. a volume's voxel spacing).
            takes_sample = "sample" in inspect.signature(overlay).parameters
            view = overlay(s.image, s.label, s.instance, table, **({"sample": s} if takes_sample else {}))
        else:
            view = instance_outline(display(s.image, domain.display_window), s.instance)
        Path(f"{base}_label{codec.label_suffix}").write_bytes(codec.label_to_bytes(s.label, context))
        Path(f"{base}_overlay.png").write_bytes(png.encode_png(view))
        meta = {
            "sample_id": s.sample_id, "split": s.split, "domain": s.domain, "pixel_spacing_mm": s.spacing_mm,
            "image_encoding": codec.describe(stored), "image_codec": codec.manifest_record(),
            "class_table": table.as_dict(), "requested": s.requested, "measured": s.measured, "bboxes": s.bboxes,
            "qc": s.qc, "seed": s.seed, "generator": s.generator, "params": s.params,
            "spec": normalised_spec(spec), "spec_hash": digest,
        }
        Path(f"{base}.json").write_text(json.dumps(meta, indent=1, default=_json_default))
        written += [Path(f"{base}{suf}") for suf in (f"_image{codec.suffix}", f"_label{codec.label_suffix}",
                                                     "_overlay.png", ".json")]
    return written
