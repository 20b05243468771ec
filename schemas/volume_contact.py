"""How a chest-CT volume finding meets what surrounds it, read from the label alone.

One rule, shared by the nodule placement (generators) and the measurement (annotators), so that a nodule placed
as touching the pleura is measured as touching it, and one placed clear of pleura and fissures is measured so.

The rule: the finding's shell is the set of voxels face-adjacent to it (one-voxel dilation with the 6-neighbour
cross, not reaching past the array's border: the grid's edge is not pleura). Vessels, airways and other
findings in the shell are set aside (they belong to the lung they run through). Of what is left:

- a voxel of any class that is not a lung lobe is pleura (body wall, mediastinum, diaphragm);
- a voxel of a lobe other than the requested one is a fissure;
- ``shell_in_lobe_fraction`` is the share of the requested lobe.
"""
from __future__ import annotations

import numpy as np

from schemas.classes import LOBES
from schemas.volume import VOLUME_IDS

LUNG_IDS: tuple[int, ...] = tuple(LOBES.values())
NODULE_IDS: tuple[int, ...] = (VOLUME_IDS["nodule_solid"], VOLUME_IDS["nodule_ground_glass"])
IN_LUNG_STRUCTURES: tuple[int, ...] = (VOLUME_IDS["pulmonary_vessel"], VOLUME_IDS["airway_lumen"],
                                       VOLUME_IDS["airway_wall"]) + NODULE_IDS

_IS_LUNG = np.zeros(256, bool)
_IS_LUNG[list(LUNG_IDS)] = True
_SET_ASIDE = np.zeros(256, bool)
_SET_ASIDE[list(IN_LUNG_STRUCTURES)] = True
_IS_PLEURA = ~(_IS_LUNG | _SET_ASIDE)  # what a shell voxel of this class means: the lung ends here


def face_shell(mask: np.ndarray) -> np.ndarray:
    """Voxels outside ``mask`` with a face neighbour inside it (6-neighbour dilation minus the mask; the array's
    border is not crossed). Equals ``scipy.ndimage.binary_dilation(mask) & ~mask``."""
    m = np.asarray(mask, bool)
    out = np.zeros_like(m)
    for ax in range(m.ndim):
        n = m.shape[ax]
        if n < 2:
            continue
        a = [slice(None)] * m.ndim
        b = [slice(None)] * m.ndim
        a[ax], b[ax] = slice(1, n), slice(0, n - 1)
        out[tuple(a)] |= m[tuple(b)]
        out[tuple(b)] |= m[tuple(a)]
    return out & ~m


def pleura_classes(label: np.ndarray) -> np.ndarray:
    """True where the label's class counts as pleura (not lung, not a vessel, airway or finding)."""
    return _IS_PLEURA[np.asarray(label, np.uint8)]


def contact_of_shell_values(sv: np.ndarray, want_id: int | None) -> dict[str, object]:
    """The contact measures from the label values of a finding's shell voxels (see the module's rule)."""
    sv = np.asarray(sv, np.uint8)
    touches_vessel = bool((sv == VOLUME_IDS["pulmonary_vessel"]).any())
    sv = sv[~_SET_ASIDE[sv]]
    lung = _IS_LUNG[sv]
    return {"shell_in_lobe_fraction": round(float((sv == want_id).mean()) if sv.size else 1.0, 5),
            "touches_pleura": bool((~lung).any()),
            "touches_fissure": bool((lung & (sv != want_id)).any()),
            "touches_vessel": touches_vessel}


def shell_contact(label: np.ndarray, mask: np.ndarray, want_id: int | None) -> dict[str, object]:
    """Contact measures of the finding ``mask`` (same shape as ``label``, typically a box round the finding with
    at least one voxel of margin where the grid allows) with pleura, fissures (lobes other than ``want_id``) and
    pulmonary vessels, as the label shows them."""
    return contact_of_shell_values(np.asarray(label)[face_shell(mask)], want_id)
