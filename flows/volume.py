"""One chest-CT volume end to end: layout -> render -> measurements -> QC -> NIfTI image + label + sidecar.

Randomness: volume ``index`` of a run with master ``seed`` draws everything from
``SeedSequence(seed, spawn_key=(index, attempt))``, so it can be rebuilt alone and equals its copy in a batch.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from annotators.ct_volume import measure_volume_findings, volume_qc
from generators.volume_pipeline import VolumeRequest, layout_volume, public_findings, render_volume_request
from schemas.errors import PlacementError
from store.nifti import nifti_bytes

GENERATOR = {"name": "procedural_volume", "version": "1.0"}


def volume_rng(seed: int, index: int, attempt: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=(int(index), int(attempt)))))


def make_volume(req: VolumeRequest, seed: int, index: int, max_attempts: int = 3) -> dict[str, Any]:
    """Build one volume; regenerate (new attempt stream) when placement or QC fails, up to ``max_attempts``."""
    history = []
    for attempt in range(max_attempts):
        rng = volume_rng(seed, index, attempt)
        try:
            lay = layout_volume(req, rng)
        except PlacementError as e:
            history.append({"attempt": attempt, "error": str(e)})
            continue
        img, rp = render_volume_request(lay, rng)
        g = lay["geometry"]
        measured = measure_volume_findings(lay["label"], lay["instance"], lay["lobes"], g, lay["nodules"])
        qc = volume_qc(img, lay["label"], lay["instance"], g, lay["nodules"], measured)
        history.append({"attempt": attempt, "passed": qc["passed"]})
        if qc["passed"] or attempt == max_attempts - 1:
            anatomy = {k: v for k, v in lay["anatomy"].items()}
            return {"image": img, "label": lay["label"], "instance": lay["instance"], "lobes": lay["lobes"], "geometry": g,
                    "measured": measured, "qc": {**qc, "attempts": attempt + 1, "history": history},
                    "params": {"anatomy": anatomy, "render": rp, "findings": public_findings(lay["nodules"]),
                               "trees": {"vessel_segments": len(lay["trees"]["vessel"]),
                                         "airway_segments": len(lay["trees"]["airway"])}},
                    "seed": {"seed": seed, "index": index, "attempt": attempt}, "generator": GENERATOR}
    raise PlacementError(f"volume {index}: no valid layout in {max_attempts} attempts: {history[-1]}")


def write_volume(vol: dict[str, Any], out_dir: Path, name: str) -> dict[str, str]:
    """Write ``name``_ct.nii.gz (int16 HU), ``name``_label.nii.gz (uint8 class ids), ``name``.json (provenance
    with the sha256 of both). Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    aff = vol["geometry"].ras_affine()
    ct = nifti_bytes(vol["image"], aff, "pairforge synthetic chest CT (HU)")
    lab = nifti_bytes(vol["label"], aff, "pairforge chest CT labels")
    paths = {"image": out_dir / f"{name}_ct.nii.gz", "label": out_dir / f"{name}_label.nii.gz",
             "meta": out_dir / f"{name}.json"}
    paths["image"].write_bytes(ct)
    paths["label"].write_bytes(lab)
    g = vol["geometry"]
    meta = {"generator": vol["generator"], "seed": vol["seed"], "synthetic": True,
            "geometry": {"shape_kji": list(g.shape), "spacing_kji_mm": list(g.spacing), "affine_ras": aff.tolist(),
                         "orientation": "RAS+ (NIfTI); i = patient left, j = posterior, k = inferior"},
            "sha256": {"image": hashlib.sha256(ct).hexdigest(), "label": hashlib.sha256(lab).hexdigest()},
            "measured": vol["measured"], "qc": vol["qc"], "params": vol["params"]}
    paths["meta"].write_text(json.dumps(meta, sort_keys=True, default=_json_default))
    return {k: str(v) for k, v in paths.items()}


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))
