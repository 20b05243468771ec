"""Surface-inspection facts for evaluations (named by ``schemas.surface``'s ``Domain.evaluation_module``): grey
levels 0-255 (colour versions are measured as luminance), one segmenter class for every defect kind, defects
measured against the good surface around them, and the good surface as the uniform region of noise spectra."""
from __future__ import annotations

from annotators.evaluation import EvalProfile, register_profile
from schemas.surface_findings import DEFECT_CLASS, OUTSIDE_PART

DEFECTS = tuple(sorted(DEFECT_CLASS.values()))
GOOD = (0,)

SURFACE = register_profile(EvalProfile(
    domain="surface",
    units="grey level",
    seg_groups={"defect": DEFECTS},
    finding_group="defect",
    finding_ids=DEFECTS,
    surround_ids=GOOD,
    # The good surface should be exposed (its median off both ends of the 8-bit scale); defects anywhere.
    reference_ranges={"good": (GOOD, 15.0, 240.0), "defect": (DEFECTS, 0.0, 255.0)},
    histogram_classes={"good": GOOD, "defect": DEFECTS, "outside_part": (OUTSIDE_PART,)},
    threshold_classes={"dark": (0.0, 84.0), "mid": (85.0, 169.0), "bright": (170.0, 255.0)},
    uniform_ids=GOOD,
    uniform_interval=(0.0, 255.0),
    value_range=(0, 255),
    windows=((127.5, 255.0), (127.5, 127.5)),
    display_window=(127.5, 255.0),
    small_finding_mm=1.0,
))
