"""Chest-CT facts for evaluations: segmenter classes (five lobes and nodules), tissue reference ranges in HU
(published ranges, ../shared/docs/DOMAIN.md, widened as in QC), realism histogram classes and uniform tissue."""
from __future__ import annotations

from annotators.ct import HU_CHECK_RANGES
from annotators.evaluation import EvalProfile, register_profile
from schemas.classes import CT_IDS, LOBES, NODULE_CLASS_IDS

C = CT_IDS
LUNG = tuple(sorted(LOBES.values()))
_IDS = {"lung": LUNG, "subcutaneous_fat": (C["subcutaneous_fat"], C["mediastinal_fat"])}

CHEST_CT = register_profile(EvalProfile(
    domain="chest_ct",
    units="HU",
    seg_groups={**{name: (k,) for name, k in LOBES.items()}, "nodule": tuple(sorted(NODULE_CLASS_IDS))},
    finding_group="nodule",
    finding_ids=tuple(sorted(NODULE_CLASS_IDS)),
    surround_ids=LUNG,
    reference_ranges={("fat" if n == "subcutaneous_fat" else n): (_IDS.get(n, (C.get(n, 0),)), lo, hi)
                      for n, (lo, hi) in HU_CHECK_RANGES.items()},
    histogram_classes={"lung": LUNG, "fat": (C["subcutaneous_fat"], C["mediastinal_fat"]),
                       "soft_tissue": (C["muscle"], C["heart"], C["great_vessel"], C["liver"]),
                       "bone": (C["cortical_bone"], C["cancellous_bone"]),
                       "nodule": tuple(sorted(NODULE_CLASS_IDS))},
    # For references without labels: the same tissues by HU interval, inside the body.
    threshold_classes={"lung": (-1000.0, -500.0), "fat": (-190.0, -30.0), "soft_tissue": (-29.0, 150.0),
                       "bone": (151.0, 1500.0)},
    uniform_ids=(C["muscle"], C["liver"], C["heart"]),
    uniform_interval=(-20.0, 100.0),
    value_range=(-1024, 1500),
    windows=((-600.0, 1500.0), (40.0, 400.0)),
    display_window=(-600.0, 1500.0),
    small_finding_mm=6.0,
))
