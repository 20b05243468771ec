"""Chest-CT built-in reference with a real background: pydicom's real CT slice (``CT_small.dcm``, 128 x 128,
0.66 mm, shipped with pydicom) with synthetic nodules inserted by pairforge's insertion route (``source:`` specs:
``generators/ct_insert.py``, measured and QC-checked by ``annotators/ct_insertion.py``), one inserted sample per
index. Named by ``schemas.chest_ct``'s ``Domain.reference_sets`` as ``ct_small_inserted``, so
``pairforge evaluate NAME@vN --real ct_small_inserted[:N]`` uses it.

The background (anatomy, scanner blur, noise texture) is real; the findings and their labels are synthetic, and
the lungs and vessels around them are computed from the slice (left and right lung, no lobes: the slice shows
only part of the chest, so nodules are 4-8 mm, the sizes that fit its lungs). Every
sample shares the same single slice: a segmenter trained on some of them has seen the test background, so only
train-on-synthetic / test-on-this (TSTR) and the realism distances are clean measures with it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Any

SPEC = """
name: ct-small-inserted
domain: chest_ct
samples: {n}
seed: {seed}
source: {{path: {path}}}
findings:
  negatives: 0
  mixture:
    - {{kind: solid, diameter_mm: [4, 8], location: any, margin: smooth}}
    - {{kind: solid, diameter_mm: [5, 8], location: any, margin: lobulated}}
    - {{kind: part_solid, diameter_mm: [6, 8], location: any}}
    - {{kind: ground_glass, diameter_mm: [6, 8], location: any}}
"""


def ct_small_folder() -> str:
    """A folder holding only pydicom's CT_small.dcm (copied once into the temp dir, keyed by its sha256)."""
    from pydicom.data import get_testdata_file

    src = get_testdata_file("CT_small.dcm")
    digest = hashlib.sha256(open(src, "rb").read()).hexdigest()[:16]
    folder = os.path.join(tempfile.gettempdir(), f"pairforge-ct-small-{digest}")
    if not os.path.exists(os.path.join(folder, "CT_small.dcm")):
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".CT_small.dcm.{os.getpid()}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, os.path.join(folder, "CT_small.dcm"))
    return folder


def ct_small_inserted_spec(n: int, seed: int = 0):
    from schemas.spec import load_spec_text

    return load_spec_text(SPEC.format(n=n, seed=seed, path=ct_small_folder()))


def ct_small_inserted_samples(n: int, size: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` samples of CT_small with inserted nodules (QC-passed), as reference rows. ``size`` is ignored: the
    real slice keeps its own 128 x 128 grid and 0.66 mm spacing."""
    from flows.pipeline import make_samples

    spec = ct_small_inserted_spec(n, seed)
    return [{"image": s.image, "label": s.label, "instance": s.instance, "spacing_mm": float(s.spacing_mm),
             "sample_id": f"ct-small-{seed}-{s.sample_id}", "findings": s.measured}
            for s in make_samples(spec, range(n))]


ct_small_inserted_samples.note = ("REAL background with SYNTHETIC findings: pydicom's real CT slice CT_small.dcm "
                                  "(one slice) with 4-8 mm nodules inserted by pairforge's insertion route; lungs "
                                  "(left/right, no lobes) and vessels computed from the slice")

__all__ = ["ct_small_inserted_samples", "ct_small_inserted_spec", "ct_small_folder"]
