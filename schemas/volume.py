"""Chest-CT volume geometry and class table (3D phantom): voxel grid, spacing, coverage, label ids.

Ids 0-24 are the chest_ct slice ids unchanged; 25-28 are the organs only a volume shows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from schemas.classes import CT_CLASSES, ClassTable

VOLUME_CLASSES = ClassTable(
    domain="chest_ct_volume",
    names={**CT_CLASSES.names, 25: "stomach", 26: "heart_chamber", 27: "gas", 28: "cartilage"},
    colors={**CT_CLASSES.colors, 25: (200, 150, 120), 26: (255, 120, 140), 27: (40, 40, 40), 28: (180, 220, 255)},
)
VOLUME_IDS: dict[str, int] = {n: k for k, n in VOLUME_CLASSES.names.items()}


@dataclass(frozen=True)
class VolumeGeometry:
    """A voxel grid in phantom millimetres.

    Arrays are indexed ``[k, j, i]`` (slice, row, column). Phantom frame: x to the patient's left (column),
    y posterior (row), z inferior from the lung apex (slice). Voxel centres: x_i = cx + (i + 0.5 - nx/2)*sx,
    y_j = cy + (j + 0.5 - ny/2)*sy, z_k = cz + (k + 0.5 - nz/2)*sz.
    """

    shape: tuple[int, int, int]  # (nz, ny, nx)
    spacing: tuple[float, float, float]  # (sz, sy, sx) mm
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (cz, cy, cx) mm in the phantom frame

    @property
    def voxel_mm3(self) -> float:
        return float(self.spacing[0] * self.spacing[1] * self.spacing[2])

    def axis_mm(self, axis: int) -> np.ndarray:
        n, s, c = self.shape[axis], self.spacing[axis], self.center[axis]
        return (c + (np.arange(n) + 0.5 - n / 2) * s).astype(np.float64)

    def to_index(self, p_mm: np.ndarray) -> np.ndarray:
        """Phantom mm (..., 3) in (z, y, x) order -> fractional voxel index (k, j, i)."""
        n = np.asarray(self.shape, float)
        return (np.asarray(p_mm) - np.asarray(self.center)) / np.asarray(self.spacing) + n / 2 - 0.5

    def to_mm(self, idx: np.ndarray) -> np.ndarray:
        n = np.asarray(self.shape, float)
        return (np.asarray(idx, float) + 0.5 - n / 2) * np.asarray(self.spacing) + np.asarray(self.center)

    def lps_affine(self, lung_apex_z_lps: float = 0.0) -> np.ndarray:
        """4x4 affine from voxel (i, j, k) to DICOM patient LPS mm: x left, y posterior, z superior."""
        sz, sy, sx = self.spacing
        a = np.diag([sx, sy, -sz, 1.0])
        origin = self.to_mm(np.zeros(3))  # (z, y, x) of voxel (0, 0, 0)
        a[:3, 3] = [origin[2], origin[1], lung_apex_z_lps - origin[0]]
        return a

    def ras_affine(self) -> np.ndarray:
        """4x4 NIfTI affine from voxel (i, j, k) to RAS+ mm (R = -L, A = -P)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.lps_affine()
