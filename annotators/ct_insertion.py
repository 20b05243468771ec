"""Measurements and QC of findings inserted into real CT slices: the phantom's size/lobe/visibility measures
(annotators/ct.py) plus the share of each finding's surrounding ring in its requested region, vessel overlap,
and the noise match of the inserted region against the parenchyma around it.

Noise match, as lesion-insertion studies validate it: inside the finding (its label at least max(2.5, 0.5 + 3 sigma)
px from its edge, sigma the scanner blur; the solid core of a part-solid one) the values minus their least-squares plane are the noise; the same mask moved to up to
eight nearby spots of clean parenchyma (lung, >= 3 px from vessels and findings) gives the reference. Compared: the noise
standard deviation and the NPS-weighted mean radial frequency (each region zero-padded into a 64 x 64 window, so
both sides see the same mask spectrum).
"""
from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from annotators import Annotation, check, register_annotator
from annotators.ct import annotate_chest_ct, contrast_to_noise, measure_findings
from schemas.chest_ct import CT_IDS, LOBES
from schemas.findings import SIDE_LOBES
from schemas.sample import Layout, SampleRequest

C = CT_IDS
NPS_WINDOW = 64
RING_MM = 2.0
SIDE_IDS = {"right": C["lung_right"], "left": C["lung_left"]}


def _region_ids(location: str) -> list[int]:
    if location == "any":
        return list(LOBES.values()) + list(SIDE_IDS.values())
    if location in SIDE_LOBES:
        return [LOBES[n] for n in SIDE_LOBES[location]] + [SIDE_IDS[location]]
    return [LOBES[location]]


def _plane_residual(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    v = img[ys, xs].astype(np.float64)
    A = np.stack([np.ones_like(xs, dtype=np.float64), xs, ys], 1)
    coef, *_ = np.linalg.lstsq(A, v, rcond=None)
    return v - A @ coef


def _nps(residual: np.ndarray, mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    win = np.zeros((NPS_WINDOW, NPS_WINDOW))
    win[ys - ys.min(), xs - xs.min()] = residual
    return np.abs(np.fft.fft2(win)) ** 2 / max(1, residual.size)


def mean_frequency(nps: np.ndarray, spacing: float) -> float:
    f = np.hypot(np.fft.fftfreq(NPS_WINDOW, spacing)[:, None], np.fft.fftfreq(NPS_WINDOW, spacing)[None, :])
    tot = float(nps.sum())
    return float((f * nps).sum() / tot) if tot > 0 else 0.0


def noise_measure(image: np.ndarray, inner: np.ndarray, clean: np.ndarray, spacing: float,
                  reach_px: float) -> dict[str, Any] | None:
    """Noise inside ``inner`` and in copies of it moved into ``clean`` parenchyma nearby; None if no room."""
    if inner.sum() < 6:
        return None
    ys, xs = np.nonzero(inner)
    if np.ptp(ys) >= NPS_WINDOW or np.ptp(xs) >= NPS_WINDOW:
        return None
    res_in = _plane_residual(image, inner)
    h, w = image.shape
    # Reference parenchyma at least 3 px from vessels, as the lesion's own interior is (placement keeps the lesion
    # off vessels and the interior starts >= 2.5 px inside it): vessel edges are structure, not noise.
    clean = cv2.erode(clean.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    refs = []
    for dist in (2.2, 3.0, 4.0):
        d = dist * reach_px + RING_MM / spacing
        for k in range(8):
            a = k * math.pi / 4
            dy, dx = int(round(d * math.sin(a))), int(round(d * math.cos(a)))
            yy, xx = ys + dy, xs + dx
            if yy.min() < 0 or xx.min() < 0 or yy.max() >= h or xx.max() >= w or not clean[yy, xx].all():
                continue
            m = np.zeros_like(inner)
            m[yy, xx] = True
            refs.append(m)
        if len(refs) >= 3:
            break
    if not refs:
        return None
    var_ref, nps_ref = [], np.zeros((NPS_WINDOW, NPS_WINDOW))
    for m in refs:
        r = _plane_residual(image, m)
        var_ref.append(float((r ** 2).mean()))
        nps_ref += _nps(r, m)
    nps_ref /= len(refs)
    nps_in = _nps(res_in, inner)
    return {"var_in": float((res_in ** 2).mean()), "var_ref": float(np.mean(var_ref)), "n_ref": len(refs),
            "nps_in": nps_in, "nps_ref": nps_ref, "pixels": int(inner.sum()),
            "mean_freq_in": mean_frequency(nps_in, spacing), "mean_freq_ref": mean_frequency(nps_ref, spacing)}


def inner_region(label: np.ndarray, instance: np.ndarray, f: dict, psf_sigma_px: float = 0.35) -> np.ndarray:
    """Where the finding is wholly itself: pixels of its mask (solid core for part-solid) at least
    max(2.5, 0.5 + 3 sigma) px from its edge, sigma the scanner blur (so partial-volume edges and thin spicules are
    not counted as noise)."""
    m = instance == f["instance"]
    if f["kind"] == "part_solid":
        m &= label == C["nodule_solid"]
    return cv2.distanceTransform(np.pad(m.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1] >= max(2.5, 0.5 + 3 * psf_sigma_px)


def ring_fraction(region: np.ndarray, instance: np.ndarray, f: dict, spacing: float) -> float:
    m = (instance == f["instance"]).astype(np.uint8)
    r = max(1, int(round(RING_MM / spacing)))
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    ring = (cv2.dilate(m, k) > 0) & (m == 0)
    if not ring.any():
        return 0.0
    return float(np.isin(region[ring], _region_ids(f["requested_location"])).mean())


def annotate_insertion(image: np.ndarray, layout: Layout, request: SampleRequest, qc: Any) -> Annotation:
    sp = layout.spacing_mm
    region = layout.extras["region"]
    vessels = layout.extras["vessels"]
    clean = layout.extras["clean"] & (layout.instance == 0)
    measured = measure_findings(layout.label, layout.instance, None, sp, layout.findings)
    # contrast_to_noise reads lung parenchyma by lobe ids; a side-only lung counts as lung there.
    lab_cnr = np.where(np.isin(layout.label, list(SIDE_IDS.values())), LOBES["RUL"], layout.label).astype(np.uint8)
    tol_mm = getattr(qc, "size_tolerance_mm", 0.5)
    cnr_min = getattr(qc, "cnr_min", 3.0)
    min_in = getattr(qc, "min_in_region", 0.99)
    checks = [check("finding_count", len(measured) == len(request.findings), len(measured),
                    f"== {len(request.findings)}")]
    for f, m in zip(layout.findings, measured):
        k = f["instance"]
        mask = layout.instance == k
        ids = _region_ids(f["requested_location"])
        m["lobe"] = f["lobe"]
        m["side"] = f["side"]
        m["in_region_fraction"] = round(float(np.isin(region[mask], ids).mean()), 5)
        m["ring_in_region_fraction"] = round(ring_fraction(region, layout.instance, f, sp), 5)
        m["vessel_overlap_px"] = int((vessels & mask).sum())
        cnr = contrast_to_noise(image, layout.instance, lab_cnr, f, sp)
        m["cnr"] = round(cnr, 3)
        psf = float(layout.params.get("psf_sigma_px", 0.35))
        nm = noise_measure(image, inner_region(layout.label, layout.instance, f, psf), clean, sp,
                           f["shape"]["radius_px"] + 0.75)
        if nm is not None:
            m["noise_std_hu"] = round(math.sqrt(nm["var_in"]), 3)
            m["surround_noise_std_hu"] = round(math.sqrt(nm["var_ref"]), 3)
            m["noise_mean_frequency_per_mm"] = round(nm["mean_freq_in"], 5)
            m["surround_mean_frequency_per_mm"] = round(nm["mean_freq_ref"], 5)
        tol = max(tol_mm, sp)
        err = abs(m.get("equivalent_diameter_mm", 0.0) - f["diameter_mm"])
        checks.append(check(f"size_{k}", err <= tol, err, f"|equivalent diameter - {f['diameter_mm']:g} mm| <= {tol:g} mm"))
        checks.append(check(f"in_lobe_{k}", m["in_region_fraction"] >= min_in, m["in_region_fraction"],
                            f">= {min_in:g} of pixels in {f['requested_location']}"))
        if not f.get("juxtapleural"):
            checks.append(check(f"ring_in_region_{k}", m["ring_in_region_fraction"] >= min_in,
                                m["ring_in_region_fraction"], f">= {min_in:g} of the {RING_MM:g} mm ring in "
                                                              f"{f['requested_location']}"))
        if not f.get("juxtavascular"):
            checks.append(check(f"off_vessels_{k}", m["vessel_overlap_px"] == 0, m["vessel_overlap_px"], "== 0 px"))
        checks.append(check(f"visible_{k}", cnr >= cnr_min, cnr, f"contrast-to-noise >= {cnr_min:g}"))
    bboxes = [{"instance": m["instance"], "x0": m["bbox_px"][0], "y0": m["bbox_px"][1], "x1": m["bbox_px"][2],
               "y1": m["bbox_px"][3]} for m in measured if "bbox_px" in m]
    return Annotation(measured=measured, checks=checks, bboxes=bboxes)


@register_annotator("chest_ct")
def annotate_chest_ct_or_insertion(image: np.ndarray, layout: Layout, request: SampleRequest, qc: Any) -> Annotation:
    """The chest-CT annotator: phantom samples as annotators/ct.py measures them, real-scan samples as above."""
    if "source" in layout.params:
        return annotate_insertion(image, layout, request, qc)
    return annotate_chest_ct(image, layout, request, qc)
