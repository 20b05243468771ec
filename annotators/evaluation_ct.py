"""Chest-CT facts for evaluations: segmenter classes (five lobes and nodules), tissue reference ranges in HU
(published ranges, ../shared/docs/DOMAIN.md, widened as in QC), realism histogram classes and uniform tissue.
Named by ``schemas.chest_ct``'s ``Domain.evaluation_module``; ``chest_ct_profile`` also serves the volume domain."""
from __future__ import annotations

from annotators.ct import HU_CHECK_RANGES
from annotators.evaluation import EvalProfile, register_profile
from schemas.classes import CT_IDS, LOBES, NODULE_CLASS_IDS


def chest_ct_profile(domain: str, ids: dict[str, int], lung_extra: tuple[int, ...] = (), volumetric: bool = False
                     ) -> EvalProfile:
    """The chest-CT evaluation profile over a class table's ids (``ids``: class name -> id); ``lung_extra``: ids
    of lung without a lobe (computed lungs of real scans with inserted findings)."""
    lung = tuple(sorted(LOBES.values())) + tuple(lung_extra)
    groups = {"lung": lung, "subcutaneous_fat": (ids["subcutaneous_fat"], ids["mediastinal_fat"])}
    return EvalProfile(
        domain=domain,
        units="HU",
        seg_groups={**{name: (k,) for name, k in LOBES.items()}, "nodule": tuple(sorted(NODULE_CLASS_IDS))},
        finding_group="nodule",
        finding_ids=tuple(sorted(NODULE_CLASS_IDS)),
        surround_ids=lung,
        reference_ranges={("fat" if n == "subcutaneous_fat" else n): (groups.get(n, (ids.get(n, 0),)), lo, hi)
                          for n, (lo, hi) in HU_CHECK_RANGES.items()},
        histogram_classes={"lung": lung, "fat": (ids["subcutaneous_fat"], ids["mediastinal_fat"]),
                           "soft_tissue": (ids["muscle"], ids["heart"], ids["great_vessel"], ids["liver"]),
                           "bone": (ids["cortical_bone"], ids["cancellous_bone"]),
                           "nodule": tuple(sorted(NODULE_CLASS_IDS))},
        # For references without labels: the same tissues by HU interval, inside the body.
        threshold_classes={"lung": (-1000.0, -500.0), "fat": (-190.0, -30.0), "soft_tissue": (-29.0, 150.0),
                           "bone": (151.0, 1500.0)},
        uniform_ids=(ids["muscle"], ids["liver"], ids["heart"]),
        uniform_interval=(-20.0, 100.0),
        value_range=(-1024, 1500),
        windows=((-600.0, 1500.0), (40.0, 400.0)),
        display_window=(-600.0, 1500.0),
        small_finding_mm=6.0,
        body_threshold=-500.0,
        volumetric=volumetric,
    )


CHEST_CT = register_profile(chest_ct_profile("chest_ct", CT_IDS,
                                             lung_extra=(CT_IDS["lung_right"], CT_IDS["lung_left"])))
