"""Fixed class tables (label id -> name, display colour) per domain. Ids never change once published."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ClassTable:
    domain: str
    names: dict[int, str]
    colors: dict[int, tuple[int, int, int]] = field(default_factory=dict)

    def id(self, name: str) -> int:
        for k, v in self.names.items():
            if v == name:
                return k
        raise KeyError(f"unknown class {name!r} in the {self.domain} table; known: {', '.join(self.names.values())}")

    def as_dict(self) -> dict[str, str]:
        return {str(k): v for k, v in sorted(self.names.items())}


# Chest CT, axial slice. Lobes follow the anatomical five-lobe model (the lingula belongs to LUL).
CT_CLASSES = ClassTable(
    domain="chest_ct",
    names={
        0: "air_outside",
        1: "table",
        2: "skin",
        3: "subcutaneous_fat",
        4: "muscle",
        5: "cortical_bone",
        6: "cancellous_bone",
        7: "mediastinal_fat",
        8: "heart",
        9: "great_vessel",
        10: "trachea_bronchus",
        11: "esophagus",
        12: "lung_rul",
        13: "lung_rml",
        14: "lung_rll",
        15: "lung_lul",
        16: "lung_lll",
        17: "pulmonary_vessel",
        18: "airway_lumen",
        19: "airway_wall",
        20: "nodule_solid",
        21: "nodule_ground_glass",
        22: "liver",
        23: "spinal_canal",
        24: "upper_abdomen",
        # Real scans (source:): a lung known only by its side, and body tissue the user's labels leave unnamed.
        25: "lung_right",
        26: "lung_left",
        27: "tissue_unlabelled",
    },
    colors={
        0: (0, 0, 0), 1: (90, 90, 90), 2: (255, 200, 160), 3: (240, 220, 120), 4: (200, 80, 80),
        5: (255, 255, 255), 6: (220, 220, 180), 7: (250, 240, 160), 8: (220, 40, 60), 9: (255, 90, 40),
        10: (60, 200, 255), 11: (180, 120, 90), 12: (70, 130, 255), 13: (60, 220, 140), 14: (150, 90, 255),
        15: (255, 170, 60), 16: (255, 90, 200), 17: (200, 30, 30), 18: (120, 230, 255), 19: (0, 150, 200),
        20: (255, 255, 0), 21: (0, 255, 255), 22: (150, 70, 40), 23: (120, 120, 255), 24: (170, 110, 80),
        25: (80, 140, 230), 26: (240, 150, 80), 27: (110, 110, 110),
    },
)

CT_IDS: dict[str, int] = {name: k for k, name in CT_CLASSES.names.items()}  # class name -> label id

LOBES: dict[str, int] = {"RUL": 12, "RML": 13, "RLL": 14, "LUL": 15, "LLL": 16}
LOBE_NAMES: dict[str, str] = {
    "RUL": "right upper lobe", "RML": "right middle lobe", "RLL": "right lower lobe",
    "LUL": "left upper lobe (lingula included)", "LLL": "left lower lobe",
}
LUNG_CLASS_IDS = frozenset(LOBES.values()) | {17, 18, 19, 20, 21, 25, 26}
NODULE_CLASS_IDS = frozenset({20, 21})


def class_table(domain: str) -> ClassTable:
    """The published class table of ``domain``; KeyError naming the known domains otherwise."""
    if domain == "chest_ct":
        return CT_CLASSES
    if domain == "surface":
        from schemas.surface import SURFACE_CLASSES  # imported here: schemas.surface imports this module

        return SURFACE_CLASSES
    raise KeyError(f"no class table for domain {domain!r}; known: chest_ct, surface")
