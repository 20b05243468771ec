"""Chest-CT volume facts for evaluations: the chest-CT profile over the volume class table (its ids 0-24 are the
slices' ids; 25-28 are stomach, heart chamber, gas and cartilage, none of them lung), volumetric: label fidelity
per finding in 3D, tissue and realism histograms over voxels, noise spectra and features on axial slices."""
from __future__ import annotations

from annotators.evaluation import register_profile
from annotators.evaluation_ct import chest_ct_profile
from schemas.volume import VOLUME_IDS

CHEST_CT_VOLUME = register_profile(chest_ct_profile("chest_ct_volume", VOLUME_IDS, volumetric=True))
