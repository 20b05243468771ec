"""Dataset evaluation metrics as plain functions of arrays: label fidelity (finding contrast and alignment, tissue
intensities against reference ranges), realism (per-class Wasserstein-1, noise power spectra, Fréchet and kernel
distances of features), memorisation (nearest neighbours in a training vs a held-out set), Dice and confidence
intervals. No I/O, no orchestration; ``flows/evaluate.py`` feeds them. Domain facts come from an ``EvalProfile``
registered per domain by the module its ``Domain.evaluation_module`` names (``annotators/evaluation_ct.py`` for
chest CT, ``evaluation_ct_volume.py``, ``evaluation_surface.py``); this module names no domain.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import cv2
import numpy as np


# ------------------------------------------------------------------------------------------- domain profiles
@dataclass(frozen=True)
class EvalProfile:
    """What an evaluation needs to know about a domain; everything is label ids, ranges and units."""

    domain: str
    units: str                                            # intensity units of images ("HU")
    seg_groups: dict[str, tuple[int, ...]]                # segmenter classes (name -> label ids); 0 = the rest
    finding_group: str                                    # the seg group that holds findings
    finding_ids: tuple[int, ...]                          # label ids of findings
    surround_ids: tuple[int, ...]                         # where a finding's ring is measured (e.g. lung)
    reference_ranges: dict[str, tuple[tuple[int, ...], float, float]]  # tissue -> (ids, lo, hi) for the median
    histogram_classes: dict[str, tuple[int, ...]]         # realism histograms per tissue (labelled sets)
    threshold_classes: dict[str, tuple[float, float]]     # tissue -> intensity interval (unlabelled references)
    uniform_ids: tuple[int, ...]                          # uniform tissue for noise power spectra
    uniform_interval: tuple[float, float]                 # same, by intensity, for unlabelled references
    value_range: tuple[int, int]                          # histogram support (integer bins)
    windows: tuple[tuple[float, float], ...]              # (centre, width) input channels of the segmenter
    display_window: tuple[float, float]
    small_finding_mm: float = 6.0                         # findings below this are reported apart
    # Unlabelled references: the object (body, part) is the largest region above this value, holes filled;
    # None = the whole image.
    body_threshold: float | None = None
    volumetric: bool = False                              # images are volumes [slices, rows, columns]
    extra: dict[str, Any] = field(default_factory=dict)


_PROFILES: dict[str, EvalProfile] = {}


def register_profile(p: EvalProfile) -> EvalProfile:
    _PROFILES[p.domain] = p
    return p


def profile_for(domain: str) -> EvalProfile:
    """The domain's evaluation profile: registered by the module its ``Domain.evaluation_module`` names (imported
    on the first look-up). SpecError naming the domains that have one otherwise."""
    from schemas.domain import all_domains, get_domain
    from schemas.errors import SpecError

    if domain not in _PROFILES:
        mod = get_domain(domain).evaluation_module
        if mod:
            importlib.import_module(mod)
    if domain not in _PROFILES:
        have = sorted(d.name for d in all_domains() if d.evaluation_module)
        raise SpecError(f"domain {domain!r} has no evaluation profile (Domain.evaluation_module); domains with one: "
                        f"{', '.join(have) or 'none'}")
    return _PROFILES[domain]


def group_labels(label: np.ndarray, groups: dict[str, tuple[int, ...]]) -> np.ndarray:
    """Label ids -> segmenter class index (0 = everything not in a group, then groups in order)."""
    lut = np.zeros(256, np.uint8)
    for i, ids in enumerate(groups.values(), start=1):
        lut[list(ids)] = i
    return lut[label]


# ------------------------------------------------------------------------------------------- label fidelity
def _disk(r: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def finding_fidelity(image: np.ndarray, label: np.ndarray, instance: np.ndarray, spacing_mm: float,
                     profile: EvalProfile, cnr_min: float = 3.0, max_offset_px: float = 2.0,
                     search_px: int = 16, min_gain: float = 0.15, min_match: float = 0.45) -> list[dict[str, Any]]:
    """Per labelled finding: does the image show it where the label says?

    ``cnr``: |median inside - median of the ring 1-4 mm outside| / MAD-based spread of the ring (the ring kept to
    the surrounding tissue, e.g. lung parenchyma). ``offset_px``: where the label's mask best matches the image
    (normalised cross-correlation within +-``search_px``); a finding drawn away from its label shows up there.
    A finding passes with cnr >= ``cnr_min`` unless the mask matches the image more than ``max_offset_px`` away
    clearly (correlation at least ``min_match``) and better there (by ``min_gain``) than at the label."""
    out = []
    img = image.astype(np.float32)
    h, w = img.shape
    r1 = max(1, int(round(1 / spacing_mm)))
    r4 = max(r1 + 2, int(round(4 / spacing_mm)))
    surround = np.isin(label, profile.surround_ids)
    notfinding = ~np.isin(label, profile.finding_ids)
    for k in np.unique(instance):
        if k == 0:
            continue
        m_full = instance == k
        ys, xs = np.nonzero(m_full)
        area = int(len(ys))
        pad = r4 + search_px + 2
        y0, y1 = max(0, ys.min() - pad), min(h, ys.max() + pad + 1)
        x0, x1 = max(0, xs.min() - pad), min(w, xs.max() + pad + 1)
        m = m_full[y0:y1, x0:x1].astype(np.uint8)
        crop = img[y0:y1, x0:x1]
        ring = (cv2.dilate(m, _disk(r4)) > 0) & ~(cv2.dilate(m, _disk(r1)) > 0)
        ring_s = ring & surround[y0:y1, x0:x1]
        if ring_s.sum() < 10:
            ring_s = ring & notfinding[y0:y1, x0:x1]
        inside = crop[m > 0]
        around = crop[ring_s] if ring_s.sum() >= 3 else crop[ring]
        med = float(np.median(around))
        sigma = 1.4826 * float(np.median(np.abs(around - med))) + 1e-6
        cnr = abs(float(np.median(inside)) - med) / sigma
        # Alignment: slide the mask (plus a thin band around it) over the image and find the best match.
        by0, by1 = ys.min() - y0 - 2, ys.max() - y0 + 3
        bx0, bx1 = xs.min() - x0 - 2, xs.max() - x0 + 3
        tmpl = m[max(0, by0):by1, max(0, bx0):bx1].astype(np.float32)
        sy0, sx0 = max(0, by0 - search_px), max(0, bx0 - search_px)
        region = crop[sy0:by1 + search_px, sx0:bx1 + search_px]
        offset = (0.0, 0.0)
        ncc0 = ncc_best = 0.0
        if tmpl.std() > 0 and region.shape[0] >= tmpl.shape[0] and region.shape[1] >= tmpl.shape[1]:
            # Contrast units, clipped: structures far brighter or darker than the finding (vessels, bone) must not
            # outweigh it. Without a finding at the label the scale falls back to a few noise spreads.
            d = float(np.median(inside)) - med
            scale = max(abs(d), 3 * sigma)
            u = np.clip((region - med) / scale * (1 if d >= 0 else -1), -1.5, 1.5).astype(np.float32)
            res = cv2.matchTemplate(u, tmpl, cv2.TM_CCOEFF_NORMED)
            res = np.nan_to_num(res)
            # Only places where the label shows surrounding tissue (or the finding itself) can hold a misplaced
            # finding; a match on labelled structures (vessels, bone) is explained by the label.
            allowed = (surround[y0:y1, x0:x1] | m_full[y0:y1, x0:x1])[sy0:by1 + search_px, sx0:bx1 + search_px]
            cover = cv2.matchTemplate(allowed.astype(np.float32), tmpl, cv2.TM_CCORR) / tmpl.sum()
            res = np.where(cover >= 0.8, res, 0.0)
            ay, ax = max(0, by0) - sy0, max(0, bx0) - sx0  # where zero offset sits in ``res``
            ncc0 = float(res[ay, ax]) if ay < res.shape[0] and ax < res.shape[1] else 0.0
            # Polarity known (the finding shows at its label): only same-polarity matches count; else either.
            j = int(np.argmax(res if abs(d) >= 3 * sigma else np.abs(res)))
            py, px = divmod(j, res.shape[1])
            ncc_best = float(res[py, px])
            offset = (float(px - ax), float(py - ay))
        off = math.hypot(*offset)
        eq_mm = 2 * math.sqrt(area / math.pi) * spacing_mm
        reasons = []
        if cnr < cnr_min:
            reasons.append(f"contrast-to-noise {cnr:.2f} < {cnr_min:g}")
        if off > max_offset_px and abs(ncc_best) >= min_match and abs(ncc_best) - ncc0 > min_gain:
            reasons.append(f"image matches the label {off:.1f} px away ({offset[0]:+.0f}, {offset[1]:+.0f})")
        out.append({"instance": int(k), "area_px": area, "equivalent_diameter_mm": round(eq_mm, 3),
                    "cnr": round(cnr, 3), "offset_px": [offset[0], offset[1]], "offset_norm_px": round(off, 3),
                    "ncc_at_label": round(ncc0, 4), "ncc_best": round(ncc_best, 4),
                    "passed": not reasons, "reason": "; ".join(reasons)})
    return out


def finding_fidelity_3d(volume: np.ndarray, label: np.ndarray, instance: np.ndarray,
                        spacing_zyx: tuple[float, float, float], profile: EvalProfile, cnr_min: float = 3.0,
                        max_offset_px: float = 2.0, shell_mm: tuple[float, float] = (1.0, 4.0)) -> list[dict[str, Any]]:
    """Per labelled finding of a volume [slices, rows, columns]: contrast-to-noise against its 3-D shell
    ``shell_mm`` outside it (Euclidean distance in mm on the anisotropic grid, kept to the surrounding tissue; the
    outer radius grows to 1.5 voxels of the coarsest axis so the shell reaches the neighbouring slices), and
    in-plane alignment on the slice where the finding is largest (``finding_fidelity`` on that slice)."""
    from scipy import ndimage

    shell_mm = (shell_mm[0], max(shell_mm[1], 1.5 * max(spacing_zyx)))
    out = []
    vol = volume.astype(np.float32)
    surround = np.isin(label, profile.surround_ids)
    notfinding = ~np.isin(label, profile.finding_ids)
    pad = [int(math.ceil(shell_mm[1] / s)) + 1 for s in spacing_zyx]
    voxel_mm3 = float(np.prod(spacing_zyx))
    for k in np.unique(instance):
        if k == 0:
            continue
        m_full = instance == k
        idx = np.nonzero(m_full)
        sl = tuple(slice(max(0, int(i.min()) - p), min(n, int(i.max()) + p + 1))
                   for i, p, n in zip(idx, pad, vol.shape))
        m = m_full[sl]
        d = ndimage.distance_transform_edt(~m, sampling=spacing_zyx)
        shell = (d > shell_mm[0]) & (d <= shell_mm[1])
        shell_s = shell & surround[sl]
        if shell_s.sum() < 10:
            shell_s = shell & notfinding[sl]
        around = vol[sl][shell_s] if shell_s.sum() >= 3 else vol[sl][shell]
        inside = vol[sl][m]
        med = float(np.median(around))
        sigma = 1.4826 * float(np.median(np.abs(around - med))) + 1e-6
        cnr = abs(float(np.median(inside)) - med) / sigma
        volume_mm3 = float(m.sum()) * voxel_mm3
        eq_mm = (6 * volume_mm3 / math.pi) ** (1 / 3)
        z = int(np.argmax(m_full.reshape(m_full.shape[0], -1).sum(1)))
        inst2 = np.where(instance[z] == k, k, 0).astype(instance.dtype)
        f2 = finding_fidelity(vol[z], label[z], inst2, spacing_zyx[1], profile, cnr_min=0.0,
                              max_offset_px=max_offset_px)
        reasons = []
        if cnr < cnr_min:
            reasons.append(f"3-D contrast-to-noise {cnr:.2f} < {cnr_min:g}")
        if f2 and f2[0]["reason"]:
            reasons.append(f"slice {z}: {f2[0]['reason']}")
        out.append({"instance": int(k), "voxels": int(m.sum()), "volume_mm3": round(volume_mm3, 2),
                    "equivalent_diameter_mm": round(eq_mm, 3), "cnr": round(cnr, 3), "shell_voxels": int(shell_s.sum()),
                    "largest_slice": z, "cnr_largest_slice": f2[0]["cnr"] if f2 else None,
                    "offset_px": f2[0]["offset_px"] if f2 else [0.0, 0.0],
                    "offset_norm_px": f2[0]["offset_norm_px"] if f2 else 0.0,
                    "passed": not reasons, "reason": "; ".join(reasons)})
    return out


def class_value_histograms(images: Sequence[np.ndarray], labels: Sequence[np.ndarray] | None,
                           classes: dict[str, tuple[int, ...]] | None, value_range: tuple[int, int],
                           intervals: dict[str, tuple[float, float]] | None = None,
                           body: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Integer-bin histograms of pixel values per class, pooled over images: by label ids when labels are given,
    else by intensity interval (``intervals``; optionally only inside ``body`` masks). Bins: value_range[0]..[1]."""
    lo, hi = value_range
    nb = hi - lo + 1
    out: dict[str, np.ndarray] = {}
    for i, img in enumerate(images):
        q = np.clip(np.rint(img.astype(np.float32)) - lo, 0, nb - 1).astype(np.int64)
        if labels is not None and classes is not None:
            lab = labels[i]
            for name, ids in classes.items():
                sel = np.isin(lab, ids)
                if sel.any():
                    out[name] = out.get(name, np.zeros(nb, np.int64)) + np.bincount(q[sel], minlength=nb)
        for name, (a, b) in (intervals or {}).items():
            sel = (img >= a) & (img <= b)
            if body is not None:
                sel &= body[i]
            if sel.any():
                out[name] = out.get(name, np.zeros(nb, np.int64)) + np.bincount(q[sel], minlength=nb)
    return out


def histogram_quantile(hist: np.ndarray, q: float, lo: int) -> float:
    cum = np.cumsum(hist)
    return float(np.searchsorted(cum, q * cum[-1])) + lo


MIN_TISSUE_PIXELS = 200  # fewer labelled pixels than this (a sliver at a slice's edge, mostly partial volume): reported, not judged


def tissue_intensity_report(hists: dict[str, np.ndarray], profile: EvalProfile) -> list[dict[str, Any]]:
    """Per tissue with a reference range: median, 5th/95th percentile, share of pixels in range, median in range
    (judged only with at least MIN_TISSUE_PIXELS pixels: a few boundary pixels of a class measure its neighbours)."""
    lo = profile.value_range[0]
    rows = []
    for name, (_, a, b) in profile.reference_ranges.items():
        h = hists.get(name)
        if h is None or h.sum() == 0:
            continue
        med = histogram_quantile(h, 0.5, lo)
        ia, ib = int(round(a)) - lo, int(round(b)) - lo
        share = float(h[max(0, ia):max(0, ib + 1)].sum() / h.sum())
        rows.append({"class": name, "median": med, "p05": histogram_quantile(h, 0.05, lo),
                     "p95": histogram_quantile(h, 0.95, lo), "range": [a, b], "share_in_range": round(share, 4),
                     "pixels": int(h.sum()),
                     "passed": bool(a <= med <= b) or int(h.sum()) < MIN_TISSUE_PIXELS,
                     **({"note": f"fewer than {MIN_TISSUE_PIXELS} pixels: not judged"}
                        if int(h.sum()) < MIN_TISSUE_PIXELS else {})})
    return rows


# ------------------------------------------------------------------------------------------- realism
def wasserstein1_hist(h1: np.ndarray, h2: np.ndarray, bin_width: float = 1.0) -> float:
    """Wasserstein-1 between two histograms on the same integer bins, in the bins' units."""
    c1 = np.cumsum(h1, dtype=np.float64) / max(h1.sum(), 1)
    c2 = np.cumsum(h2, dtype=np.float64) / max(h2.sum(), 1)
    return float(np.abs(c1 - c2).sum() * bin_width)


def uniform_rois(mask: np.ndarray, roi: int, max_rois: int = 16, stride: int | None = None) -> list[tuple[int, int]]:
    """Top-left corners of non-overlapping ``roi``x``roi`` squares lying wholly inside ``mask`` (eroded by 2 px)."""
    m = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8))
    integral = cv2.integral(m)
    stride = stride or roi
    out = []
    h, w = m.shape
    for y in range(0, h - roi + 1, stride):
        for x in range(0, w - roi + 1, stride):
            s = integral[y + roi, x + roi] - integral[y, x + roi] - integral[y + roi, x] + integral[y, x]
            if s == roi * roi:
                out.append((y, x))
    if len(out) > max_rois:  # spread over the image, deterministically
        idx = np.linspace(0, len(out) - 1, max_rois).round().astype(int)
        out = [out[i] for i in idx]
    return out


def noise_power_spectrum(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], spacings: Sequence[float],
                         freqs: np.ndarray, roi_mm: float = 24.0, max_rois: int = 16) -> dict[str, Any]:
    """Radially averaged 2D noise power spectrum (units²·mm²) in uniform tissue, on the frequency grid ``freqs``
    (cycles/mm). Each ROI is detrended by a fitted plane; spectra are averaged over ROIs and images."""
    acc = np.zeros(len(freqs))
    cnt = np.zeros(len(freqs))
    n_roi = 0
    var = []
    for img, mask, sp in zip(images, masks, spacings):
        roi = max(8, int(round(roi_mm / sp)))
        corners = uniform_rois(mask, roi, max_rois)
        if not corners:
            continue
        yy, xx = np.mgrid[0:roi, 0:roi].astype(np.float64)
        A = np.stack([np.ones(roi * roi), xx.ravel(), yy.ravel()], 1)
        f = np.fft.fftfreq(roi, d=sp)
        fr = np.hypot(f[None, :], f[:, None])
        for (y, x) in corners:
            p = img[y:y + roi, x:x + roi].astype(np.float64)
            coef, *_ = np.linalg.lstsq(A, p.ravel(), rcond=None)
            r = p - (A @ coef).reshape(roi, roi)
            var.append(float(r.var()))
            ps = np.abs(np.fft.fft2(r)) ** 2 * (sp * sp) / (roi * roi)
            # Bin onto the grid (nearest grid frequency within half a bin).
            step = freqs[1] - freqs[0] if len(freqs) > 1 else 1.0
            idx = np.rint((fr - freqs[0]) / step).astype(int)
            ok = (idx >= 0) & (idx < len(freqs)) & (fr <= 0.5 / sp)
            np.add.at(acc, idx[ok], ps[ok])
            np.add.at(cnt, idx[ok], 1)
            n_roi += 1
    nps = np.where(cnt > 0, acc / np.maximum(cnt, 1), np.nan)
    return {"freqs": freqs, "nps": nps, "rois": n_roi, "noise_std": float(np.sqrt(np.mean(var))) if var else None}


def nps_distance(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Mean |log10 NPS_a - log10 NPS_b| over the frequencies both measured (decades; 0 = same spectrum)."""
    x, y = np.asarray(a["nps"]), np.asarray(b["nps"])
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    ok[0] = False  # the DC bin is what detrending removed
    if ok.sum() < 3:
        return None
    return float(np.mean(np.abs(np.log10(x[ok]) - np.log10(y[ok]))))


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula)."""
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    s1, s2 = np.atleast_2d(s1), np.atleast_2d(s2)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        eps = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def kernel_distance(f1: np.ndarray, f2: np.ndarray, subsets: int = 20, subset_size: int = 100,
                    rng: np.random.Generator | None = None) -> tuple[float, float]:
    """KID: unbiased MMD² with the cubic polynomial kernel, mean and std over random subsets."""
    rng = rng or np.random.default_rng(0)
    d = f1.shape[1]
    m = min(subset_size, len(f1), len(f2))
    vals = []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        vals.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                    - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


# ------------------------------------------------------------------------------------------- memorisation
def pixel_vectors(images: Sequence[np.ndarray], window: tuple[float, float], size: int = 64) -> np.ndarray:
    """Images as vectors for nearest-neighbour search: windowed to [0, 1], resized to ``size``², flattened."""
    c, w = window
    out = np.empty((len(images), size * size), np.float32)
    for i, img in enumerate(images):
        x = np.clip((img.astype(np.float32) - (c - w / 2)) / w, 0, 1)
        out[i] = cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA).ravel()
    return out


def nearest(query: np.ndarray, ref: np.ndarray, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """RMS distance to and index of each query vector's nearest neighbour in ``ref``."""
    q2 = (query.astype(np.float64) ** 2).sum(1)[:, None]
    r2 = (ref.astype(np.float64) ** 2).sum(1)[None, :]
    d2 = np.maximum(q2 + r2 - 2 * query.astype(np.float64) @ ref.astype(np.float64).T, 0)
    if exclude_self:
        np.fill_diagonal(d2, np.inf)
    j = d2.argmin(1)
    return np.sqrt(d2[np.arange(len(query)), j] / query.shape[1]), j


def memorisation_report(gen: np.ndarray, train: np.ndarray, heldout: np.ndarray, copy_factor: float = 0.5,
                        ratio_max: float = 0.5) -> dict[str, Any]:
    """Each generated vector's nearest training and held-out neighbours. ``copy_threshold`` is ``copy_factor``
    times the 5th percentile of the distances from held-out real images to their nearest training image: closer
    to a training image than independent real images ever get. A generated image is flagged as a near-copy when
    its training distance is under that threshold and under ``ratio_max`` times its held-out distance."""
    d_tr, j_tr = nearest(gen, train)
    d_ho, j_ho = nearest(gen, heldout)
    ref_d, _ = nearest(heldout, train)
    thr = copy_factor * float(np.percentile(ref_d, 5))
    ratio = d_tr / np.maximum(d_ho, 1e-12)
    flagged = np.nonzero((d_tr < thr) & (ratio < ratio_max))[0]
    return {"d_train": d_tr, "j_train": j_tr, "d_heldout": d_ho, "j_heldout": j_ho, "ratio": ratio,
            "copy_threshold": thr, "heldout_to_train_p05": float(np.percentile(ref_d, 5)),
            "flagged": [int(i) for i in flagged]}


# ------------------------------------------------------------------------------------------- Dice and intervals
def dice_per_class(pred: np.ndarray, target: np.ndarray, n_classes: int) -> np.ndarray:
    """Dice of classes 1..n_classes-1 for one image; NaN where the class is absent from both."""
    out = np.full(n_classes - 1, np.nan)
    for c in range(1, n_classes):
        p, t = pred == c, target == c
        s = int(p.sum()) + int(t.sum())
        if s:
            out[c - 1] = 2.0 * int((p & t).sum()) / s
    return out


def finding_dice(pred: np.ndarray, target: np.ndarray, instance: np.ndarray, cls: int) -> list[tuple[int, float]]:
    """Per labelled finding: Dice of the predicted class ``cls`` inside the finding's neighbourhood (the finding
    dilated by its own radius), so each finding is scored on its own."""
    out = []
    for k in np.unique(instance):
        if k == 0:
            continue
        m = (instance == k).astype(np.uint8)
        r = max(2, int(round(math.sqrt(m.sum() / math.pi))))
        hood = cv2.dilate(m, _disk(r)) > 0
        p, t = (pred == cls) & hood, (target == cls) & hood & (m > 0)
        s = int(p.sum()) + int(t.sum())
        out.append((int(k), 2.0 * int((p & t).sum()) / s if s else 1.0))
    return out


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean and two-sided Student-t confidence interval over independent runs (e.g. seeds)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if len(v) == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    if len(v) == 1:
        return {"mean": float(v[0]), "lo": float("nan"), "hi": float("nan"), "n": 1}
    from scipy import stats

    half = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": float(v.mean()), "lo": float(v.mean() - half), "hi": float(v.mean() + half), "n": int(len(v))}


__all__ = ["EvalProfile", "register_profile", "profile_for", "group_labels", "finding_fidelity", "finding_fidelity_3d",
           "class_value_histograms", "tissue_intensity_report", "wasserstein1_hist", "noise_power_spectrum",
           "nps_distance", "frechet_distance", "kernel_distance", "pixel_vectors", "nearest", "memorisation_report",
           "dice_per_class", "finding_dice", "mean_ci", "body_mask"]


def body_mask(image: np.ndarray, threshold: float) -> np.ndarray:
    """The largest connected region above ``threshold`` with its holes filled (the body on a CT slice)."""
    m = (image > threshold).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=4)
    if n <= 1:
        return np.zeros(image.shape, bool)
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    body = (lab == k).astype(np.uint8)
    # Fill holes: everything not reachable from the border outside the body belongs to it.
    pad = np.pad(body, 1)
    flood = pad.copy()
    cv2.floodFill(flood, None, (0, 0), 1)
    holes = (flood == 0)[1:-1, 1:-1]
    return (body > 0) | holes
