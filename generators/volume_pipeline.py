"""One chest-CT volume from a request: anatomy -> trees -> label volume -> nodules -> HU volume.

``VolumeRequest`` is what the volume must contain (grid, coverage, findings); ``layout_volume`` and
``render_volume_request`` take the sample's rng and draw everything else from it, recording every value.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from generators.chest_ct_volume import draw_volume, draw_volume_anatomy, grow_trees, lobe_atlas
from generators.ct_volume_render import draw_volume_render_params, render_volume
from generators.nodule_volume import place_nodules
from schemas.classes import LOBES
from schemas.volume import VolumeGeometry


@dataclass
class VolumeRequest:
    shape: tuple[int, int, int]  # (nz, ny, nx) voxels
    spacing: tuple[float, float, float]  # (sz, sy, sx) mm
    z_center_level: float = 0.5  # centre of the coverage: 0 = lung apex, 1 = lung base
    findings: list[dict[str, Any]] = field(default_factory=list)
    center_on_lobe: str | None = None  # small crops: centre the grid on this lobe (accuracy benches)


def volume_geometry(req: VolumeRequest, P: dict[str, Any], rng: np.random.Generator | None = None) -> VolumeGeometry:
    H = P["lung_height_mm"]
    center = (req.z_center_level * H, 0.0, 0.0)
    if req.center_on_lobe:
        from scipy.ndimage import distance_transform_edt

        atlas, g = lobe_atlas(P)
        inside = atlas == LOBES[req.center_on_lobe]
        dist = distance_transform_edt(inside, sampling=g.spacing)
        idx = np.argwhere(dist >= 0.7 * dist.max()) if dist.max() > 0 else np.zeros((0, 3), int)
        juxta = [f for f in req.findings if f.get("juxtapleural") and f.get("location") == req.center_on_lobe]
        if juxta:  # a juxtapleural finding needs pleura in the crop: centre near the lobe's pleural surface
            d = max(float(f["diameter_mm"]) for f in juxta)
            to_pleura = distance_transform_edt(atlas != 0, sampling=g.spacing)
            to_other = distance_transform_edt(~(inside | (atlas == 0)), sampling=g.spacing)
            band = inside & (to_pleura <= 8.0)
            if band.any():  # the part of that band farthest from the other lobes (fissures)
                far = to_other[band].max()
                idx = np.argwhere(band & (to_other >= min(far, d + 10.0) * 0.8))
        if len(idx):  # deep inside the lobe, so a crop round it has room for a finding
            pick = idx[int(rng.integers(len(idx)))] if rng is not None else idx[len(idx) // 2]
            center = tuple(float(v) for v in g.to_mm(pick))
    return VolumeGeometry(tuple(int(v) for v in req.shape), tuple(float(v) for v in req.spacing), center)


def layout_volume(req: VolumeRequest, rng: np.random.Generator) -> dict[str, Any]:
    P = draw_volume_anatomy(rng)
    geom = volume_geometry(req, P, rng)
    trees = grow_trees(P)
    lay = draw_volume(P, geom, trees=trees)
    instance = np.zeros(geom.shape, np.uint8)
    placed = place_nodules(rng, req.findings, geom, lay["lobes"], lay["label"], instance, trees)
    lay.update({"instance": instance, "nodules": placed, "anatomy": P, "geometry": geom, "trees": trees})
    return lay


def render_volume_request(lay: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    geom = lay["geometry"]
    p = draw_volume_render_params(rng, geom.spacing)
    return render_volume(lay, geom, p), p


def public_findings(placed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Placed findings without the in-memory raster (for provenance)."""
    return [{k: v for k, v in f.items() if not k.startswith("_")} for f in placed]


# ---------------------------------------------------------------- the chest_ct_volume domain's layout and renderer
from generators.base import Renderer, register_layout, register_renderer  # noqa: E402
from schemas.sample import Layout, SampleRequest  # noqa: E402

VOLUME_DOMAIN = "chest_ct_volume"


def request_from_sample(request: SampleRequest) -> VolumeRequest:
    """The volume request of a shared-planner sample request (grid in ``params``, findings as planned)."""
    p = request.params
    return VolumeRequest(shape=tuple(int(v) for v in p["volume_size"]),
                         spacing=tuple(float(v) for v in p["spacing_zyx_mm"]),
                         z_center_level=float(p.get("z_center_level", 0.5)), findings=list(request.findings))


@register_layout(VOLUME_DOMAIN)
def chest_ct_volume_layout(spec: Any, request: SampleRequest, rng: np.random.Generator) -> Layout:
    """One volume's layout: label [k, j, i] uint8, instance uint16; the in-memory phantom in ``extras['volume']``
    (what the renderer and the annotator read); geometry and RAS affine in ``params``."""
    lay = layout_volume(request_from_sample(request), rng)
    g = lay["geometry"]
    params = {"geometry": {"shape_kji": list(g.shape), "spacing_kji_mm": list(g.spacing), "center_mm": list(g.center),
                           "orientation": "RAS+ (NIfTI); i = patient left, j = posterior, k = inferior"},
              "affine_ras": g.ras_affine().tolist(), "anatomy": lay["anatomy"],
              "trees": {"vessel_segments": len(lay["trees"]["vessel"]), "airway_segments": len(lay["trees"]["airway"])}}
    return Layout(label=lay["label"], instance=lay["instance"].astype(np.uint16), spacing_mm=float(g.spacing[1]),
                  findings=public_findings(lay["nodules"]), params=params, extras={"volume": lay})


@register_renderer
class ChestCTVolumeRenderer(Renderer):
    """The 3D HU renderer (partial volume, slice profile, PSF, correlated noise) of ``ct_volume_render``."""

    name = "procedural"
    version = "volume-1.0"
    domains = (VOLUME_DOMAIN,)

    def render(self, layout: Layout, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        return render_volume_request(layout.extras["volume"], rng)
