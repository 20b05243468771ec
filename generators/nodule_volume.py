"""3D pulmonary nodules: shapes (smooth, lobulated, spiculated), exact-volume calibration, placement in a lobe.

A nodule is the sublevel set {gamma <= s} of a gauge function gamma (homogeneous of degree 1 round its
centre: the body is a sphere with a wavy radius, each spicule a cone). Scaling by s is monotone, so the
calibration is exact: s is the n-th smallest gamma of the voxel grid, n = round(requested volume / voxel
volume). The renderer gets gamma itself for soft, irregular edges.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from schemas.classes import LOBES
from schemas.errors import PlacementError, SpecError
from schemas.volume import VOLUME_IDS, VolumeGeometry
from schemas.volume_contact import face_shell, pleura_classes, shell_contact

V = VOLUME_IDS
LOBE_NAME = {v: k for k, v in LOBES.items()}


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def draw_nodule_shape(rng: np.random.Generator, kind: str, margin: str) -> dict[str, Any]:
    """Shape parameters in units of the nominal radius (all recorded)."""
    amp = {"smooth": (0.02, 0.05), "lobulated": (0.09, 0.16), "spiculated": (0.04, 0.08)}[margin]
    nh = {"smooth": 2, "lobulated": 4, "spiculated": 3}[margin]
    shape: dict[str, Any] = {
        "axes": [1.0, float(rng.uniform(0.8, 1.0)), float(rng.uniform(0.75, 1.0))],
        "harmonics": [{"axis": _unit(rng, 1)[0].tolist(), "order": int(rng.integers(2, 5 if margin == "lobulated" else 4)),
                       "amp": float(rng.uniform(*amp)), "phase": float(rng.uniform(0, 2 * math.pi))} for _ in range(nh)],
        "spicules": [],
        "edge_mm": float(rng.uniform(0.25, 0.5) if kind == "solid" else rng.uniform(0.7, 1.4)),
        "texture_hu": float(rng.uniform(6, 14) if kind == "solid" else rng.uniform(35, 60)),
        "seed": int(rng.integers(0, 2**31 - 1)),
    }
    if margin == "spiculated":
        k = int(rng.integers(7, 15))
        shape["spicules"] = [{"axis": a.tolist(), "length": float(rng.uniform(1.35, 2.1)),
                              "width": float(rng.uniform(0.08, 0.16))} for a in _unit(rng, k)]
    if kind == "part_solid":
        shape["core"] = {"fraction": float(rng.uniform(0.35, 0.65)), "offset": (_unit(rng, 1)[0] * rng.uniform(0, 0.2)).tolist(),
                         "harmonics": [{"axis": _unit(rng, 1)[0].tolist(), "order": int(rng.integers(2, 4)),
                                        "amp": float(rng.uniform(0.04, 0.12)), "phase": float(rng.uniform(0, 6.28))}
                                       for _ in range(3)]}
    return shape


def _body_gauge(p: np.ndarray, axes, harmonics) -> np.ndarray:
    q = p / np.asarray(axes)
    r = np.linalg.norm(q, axis=-1)
    u = q / np.maximum(r, 1e-9)[..., None]
    R = np.ones_like(r)
    for h in harmonics:
        c = np.clip(u @ np.asarray(h["axis"]), -1, 1)
        R += h["amp"] * np.cos(h["order"] * np.arccos(c) + h["phase"])
    return r / np.maximum(R, 0.4)


def nodule_gauge(p: np.ndarray, shape: dict) -> np.ndarray:
    """gamma at points ``p`` (..., 3), in units of the nominal radius, relative to the centre."""
    g = _body_gauge(p, shape["axes"], shape["harmonics"])
    b = 0.3
    for sp in shape["spicules"]:
        a = np.asarray(sp["axis"])
        t = p @ a
        rho = np.linalg.norm(p - t[..., None] * a, axis=-1)
        L, w = sp["length"], sp["width"]
        gs = np.maximum(np.maximum(t / L, -t / b), (rho * (L + b) / w + t) / L)
        g = np.minimum(g, gs)
    return g


def core_gauge(p: np.ndarray, shape: dict) -> np.ndarray:
    c = shape["core"]
    return _body_gauge(p - np.asarray(c["offset"]), [1, 1, 1], c["harmonics"])


def reach(shape: dict) -> float:
    """Largest extent of the unit shape (gamma <= 1) from its centre, in nominal radii."""
    body = 1.0 + sum(h["amp"] for h in shape["harmonics"])
    return max([body * max(shape["axes"])] + [s["length"] for s in shape["spicules"]])


@dataclass
class NoduleRaster:
    box: tuple[slice, slice, slice]
    mask: np.ndarray  # bool, the nodule (label)
    core: np.ndarray | None  # bool, solid part of a part-solid nodule
    gamma: np.ndarray  # float32 gauge / s: 1 at the label boundary
    radius_mm: float  # scaled nominal radius (for converting gamma to mm)


def rasterise_nodule(center_mm: np.ndarray, diameter_mm: float, volume_mm3: float | None, shape: dict,
                     geom: VolumeGeometry, margin_mm: float = 0.0, clip: bool = False) -> NoduleRaster | None:
    """Voxelise a nodule with exactly round(volume / voxel volume) voxels. None if its box leaves the grid; with
    ``clip``, the box is cut at the grid instead, and None only if the nodule plus ``margin_mm`` reaches a cut face
    (the sublevel sets of the gauge are star-shaped round the centre, so then none of the nodule lies beyond)."""
    R0 = diameter_mm / 2
    target = volume_mm3 if volume_mm3 is not None else math.pi / 6 * diameter_mm ** 3
    n_target = max(1, int(round(target / geom.voxel_mm3)))
    ext = reach(shape) * R0 * 1.35 + margin_mm + 2 * max(geom.spacing)
    lo = np.floor(geom.to_index(center_mm - ext)).astype(int)
    hi = np.ceil(geom.to_index(center_mm + ext)).astype(int) + 1
    cut_lo, cut_hi = lo < 0, hi > np.asarray(geom.shape)
    if cut_lo.any() or cut_hi.any():
        if not clip:
            return None
        lo, hi = np.maximum(lo, 0), np.minimum(hi, np.asarray(geom.shape))
        if ((hi - lo) < 3).any() or not ((lo <= geom.to_index(center_mm)) & (geom.to_index(center_mm) < hi)).all():
            return None
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    axes = [geom.axis_mm(i)[box[i]] - center_mm[i] for i in range(3)]
    P = np.stack(np.meshgrid(*axes, indexing="ij"), -1) / R0
    g = nodule_gauge(P, shape).astype(np.float32)
    flat = g.ravel()
    if n_target >= flat.size:
        return None
    part = np.partition(flat, [n_target - 1, n_target])
    s = 0.5 * (float(part[n_target - 1]) + float(part[n_target]))
    mask = g <= s
    if clip and (cut_lo.any() or cut_hi.any()):
        keep = g <= s * (1 + margin_mm / (R0 * s) + 1e-6)  # the nodule and its margin must not meet a cut face
        for ax in range(3):
            for cut, end in ((cut_lo[ax], 0), (cut_hi[ax], -1)):
                if cut and np.take(keep, end, axis=ax).any():
                    return None
    core = None
    if "core" in shape:
        gc = core_gauge(P, shape)
        n_core = max(1, int(round(n_target * shape["core"]["fraction"] ** 3)))
        vals = np.sort(gc[mask])
        sc = 0.5 * (vals[min(n_core, len(vals)) - 1] + vals[min(n_core, len(vals) - 1)])
        core = mask & (gc <= sc)
    return NoduleRaster(box, mask, core, g / s, R0 * s)


def _lobe_voxels(lobes: np.ndarray, lobe_id: int) -> np.ndarray:
    return np.flatnonzero(lobes.ravel() == lobe_id)


def place_nodules(rng: np.random.Generator, findings: list[dict[str, Any]], geom: VolumeGeometry,
                  lobes: np.ndarray, label: np.ndarray, instance: np.ndarray, trees: dict | None = None,
                  margin_mm: float | None = None, max_tries: int = 400) -> list[dict[str, Any]]:
    """Place each requested finding inside its lobe (off the pleura and fissures by ``margin_mm`` unless
    juxtapleural; touching a vessel if juxtavascular) and paint label + instance. Raises PlacementError."""
    if margin_mm is None:  # clear of the pleura and fissures by 1.5 mm plus one voxel in every direction
        margin_mm = 1.5 + max(geom.spacing)
    placed: list[dict[str, Any]] = []
    cache: dict[int, np.ndarray] = {}
    vol_by_lobe = {L: None for L in LOBES.values()}
    for k, f in enumerate(findings, start=1):
        want = f.get("location", "any")
        if want == "any":
            counts = np.bincount(lobes[::4, ::4, ::4].ravel(), minlength=17)[list(LOBES.values())].astype(float)
            if counts.sum() == 0:
                raise PlacementError("the volume shows no lung to place a nodule in")
            lobe_id = list(LOBES.values())[int(rng.choice(5, p=counts / counts.sum()))]
        else:
            lobe_id = LOBES[want]
        if lobe_id not in cache:
            cache[lobe_id] = _lobe_voxels(lobes, lobe_id)
        vox = cache[lobe_id]
        if len(vox) == 0:
            raise PlacementError(f"lobe {want} is not in this volume's coverage")
        shape = draw_nodule_shape(rng, f["kind"], f.get("margin", "smooth"))
        d = float(f["diameter_mm"])
        juxta_p = bool(f.get("juxtapleural", False))
        juxta_v = bool(f.get("juxtavascular", False))
        vessel_pts = None
        if juxta_v and trees is not None:
            t = trees["vessel"]
            r = 0.5 * (t.r0 + t.r1)
            mid = 0.5 * (t.p0 + t.p1)
            idx = geom.to_index(mid)
            ok = (r >= 0.8) & np.all((idx >= 0) & (idx < np.asarray(geom.shape) - 1), axis=1)
            ii = np.round(idx[ok]).astype(int)
            ok_l = lobes[ii[:, 0], ii[:, 1], ii[:, 2]] == lobe_id
            vessel_pts = (mid[ok][ok_l], r[ok][ok_l])
        done = None
        tries = 0
        surface = None
        for tries in range(1, max_tries + 1):
            if juxta_v and vessel_pts is not None and len(vessel_pts[0]):
                j = int(rng.integers(len(vessel_pts[0])))
                n = _unit(rng, 1)[0]
                c = vessel_pts[0][j] + n * (d / 2 + vessel_pts[1][j] * 0.6)
            elif juxta_p:
                # On the pleura as the label shows it: a lobe voxel face-adjacent to pleura, the outward normal
                # there, and the deepest whole-voxel shift along it at which the nodule's face shell still meets
                # the pleura with the nodule wholly in the lobe (schemas.volume_contact, the measurement's rule).
                if surface is None:
                    surface = pleural_surface(lobes, label, lobe_id)
                    ext = d / 2 + margin_mm + 2 * max(geom.spacing)  # at least the body fits (boxes may be cut)
                    rv = np.ceil(ext / np.asarray(geom.spacing)).astype(int) + 1
                    fits = np.all((surface >= rv) & (surface < np.asarray(geom.shape) - rv), axis=1)
                    surface = surface[fits]
                    if len(surface) == 0:
                        raise NoPleuraError(
                            f"a juxtapleural nodule of {d:g} mm needs the pleura of lobe {LOBE_NAME[lobe_id]} in the "
                            f"volume with room round it, and this volume of {geom.shape[2]} x {geom.shape[1]} x "
                            f"{geom.shape[0]} voxels shows none; accepted: a field of view that reaches the chest "
                            f"wall beside that lobe, or juxtapleural: false")
                q = surface[int(rng.integers(len(surface)))]
                n = _outward_normal(lobes, q, geom)
                if n is None:
                    continue
                c = _abut(geom.to_mm(q.astype(float)), n, d, f.get("volume_mm3"), shape, geom, margin_mm, lobes,
                          label, instance, lobe_id)
                if c is None:
                    continue
            else:
                c = geom.to_mm(np.array(np.unravel_index(vox[int(rng.integers(len(vox)))], geom.shape), float)
                               + rng.uniform(-0.5, 0.5, 3))
            ras = rasterise_nodule(c, d, f.get("volume_mm3"), shape, geom, margin_mm, clip=juxta_p)
            if ras is None:
                continue
            lb = lobes[ras.box]
            inst = instance[ras.box]
            if (inst[_grow26(ras.mask)] > 0).any():
                continue  # overlapping or touching another finding (the label would show one region)
            contact = shell_contact(label[ras.box], ras.mask, lobe_id)
            if contact["touches_fissure"]:
                continue
            if juxta_p:
                if not (lb[ras.mask] == lobe_id).all() or not contact["touches_pleura"]:
                    continue
                near = ras.gamma <= 1 + margin_mm / ras.radius_mm
                vals = lb[near]
                if ((vals != 0) & (vals != lobe_id)).any():
                    continue  # near a fissure
            else:
                if contact["touches_pleura"]:
                    continue
                far = ras.gamma <= 1 + margin_mm / ras.radius_mm
                if not (lb[far] == lobe_id).all():
                    continue
                if juxta_v and not (contact["touches_vessel"] or (
                        label[ras.box][ras.gamma <= 1 + 0.8 / ras.radius_mm] == V["pulmonary_vessel"]).any()):
                    continue
            done = (c, ras)
            break
        if done is None:
            raise PlacementError(f"no room for a {d:g} mm {f['kind']} nodule in {want} after {max_tries} tries")
        c, ras = done
        lab = label[ras.box]
        kid = V["nodule_ground_glass"] if f["kind"] in ("ground_glass", "part_solid") else V["nodule_solid"]
        lab[ras.mask] = kid
        if ras.core is not None:
            lab[ras.core] = V["nodule_solid"]
        instance[ras.box][ras.mask] = k
        placed.append({**f, "instance": k, "center_mm": [round(float(v), 4) for v in c], "lobe_id": lobe_id,
                       "shape": shape, "tries": tries, "box": [[s.start, s.stop] for s in ras.box],
                       "radius_mm": ras.radius_mm, "_raster": ras})
    return placed


class NoPleuraError(PlacementError, SpecError):
    """A juxtapleural nodule was asked for in a lobe whose pleura the volume does not show (retried by the
    pipeline like any placement failure; a SpecError for callers that judge the request itself)."""

    def __init__(self, message: str):
        SpecError.__init__(self, message)


def pleural_surface(lobes: np.ndarray, label: np.ndarray, lobe_id: int) -> np.ndarray:
    """Voxel indices (N, 3) of the lobe that have a face neighbour the label shows as pleura (inside the grid: its
    border is not pleura)."""
    m = lobes == lobe_id
    wall = pleura_classes(label)
    near = np.zeros_like(m)
    for ax in range(3):
        n = m.shape[ax]
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[ax], b[ax] = slice(1, n), slice(0, n - 1)
        near[tuple(a)] |= wall[tuple(b)]
        near[tuple(b)] |= wall[tuple(a)]
    return np.argwhere(m & near)


def _outward_normal(lobes: np.ndarray, q: np.ndarray, geom: VolumeGeometry, radius_mm: float = 4.0):
    """Unit vector (mm frame) from the centroid of the lung voxels round ``q`` to ``q``: out of the lung."""
    rv = np.maximum(1, np.round(radius_mm / np.asarray(geom.spacing)).astype(int))
    lo = np.maximum(0, q - rv)
    hi = np.minimum(np.asarray(lobes.shape), q + rv + 1)
    win = lobes[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] != 0
    idx = np.argwhere(win)
    if len(idx) == 0:
        return None
    v = (q - lo - idx.mean(0)) * np.asarray(geom.spacing)
    nv = float(np.linalg.norm(v))
    return v / nv if nv > 1e-6 else None


def _grow26(mask: np.ndarray) -> np.ndarray:
    """``mask`` and its 26-neighbourhood (inside its box)."""
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, np.ones((3, 3, 3), bool))


def _face_steps(offsets: list[np.ndarray]) -> list[np.ndarray]:
    """The distinct offsets in order, with steps filled in so that consecutive ones differ by one voxel along
    one axis (a nodule moved that way cannot cross into the pleura without first touching it face to face)."""
    out = [offsets[0]]
    for o in offsets[1:]:
        cur = out[-1].copy()
        while (cur != o).any():
            ax = int(np.argmax(np.abs(o - cur)))
            cur = cur.copy()
            cur[ax] += int(np.sign(o[ax] - cur[ax]))
            out.append(cur)
    return out


def _abut(q_mm, n, d, volume_mm3, shape, geom, margin_mm, lobes, label, instance, lobe_id):
    """Centre of a nodule that abuts the pleura at surface voxel ``q_mm`` (outward normal ``n``): rasterised once
    about one radius inside, then shifted by whole voxels along ``n`` (the voxel set, hence the volume, is the
    same); the deepest shift at which the face shell meets pleura in the label, every nodule voxel is in the lobe
    and no other finding is within a voxel. None if no shift works (the caller verifies on a fresh raster)."""
    c0 = q_mm - n * (d / 2)
    ras = rasterise_nodule(c0, d, volume_mm3, shape, geom, margin_mm, clip=True)
    if ras is None:
        return None
    sp = np.asarray(geom.spacing)
    grid = np.asarray(geom.shape)
    m_idx = np.argwhere(ras.mask)
    s_idx = np.argwhere(face_shell(ras.mask))
    g_idx = np.argwhere(_grow26(ras.mask) & ~ras.mask)
    box0 = np.array([s.start for s in ras.box])
    lo, hi = box0 + g_idx.min(0), box0 + g_idx.max(0) + 1  # the nodule and its one-voxel ring must stay in the grid
    r = ras.radius_mm
    ts = np.arange(-r, r + 1e-9, 0.5 * float(sp.min()))  # depth offsets along n, deep (negative) to shallow
    for o in _face_steps([np.round(t * n / sp).astype(int) for t in ts]):
        if (lo + o < 0).any() or (hi + o > grid).any():
            continue
        base = box0 + o
        s = s_idx + base
        if not pleura_classes(label[s[:, 0], s[:, 1], s[:, 2]]).any():
            continue
        mm = m_idx + base
        if not (lobes[mm[:, 0], mm[:, 1], mm[:, 2]] == lobe_id).all() or instance[mm[:, 0], mm[:, 1], mm[:, 2]].any():
            continue
        gg = g_idx + base
        if instance[gg[:, 0], gg[:, 1], gg[:, 2]].any():
            continue
        return c0 + o * sp
    return None

