"""Reading the user's CT scans (NIfTI, DICOM series, 16-bit PNG slices) and what insertion needs to know of them:
the lung (from the user's label map, or computed), vessels inside it, and the local noise (std and NPS).

Reads files, never writes them. Everything is returned in one display convention: a volume ``hu[z, row, col]``
in Hounsfield units with rows running anterior -> posterior and columns patient right -> left (radiological).
Nothing identifying is kept: a scan is known by the sha256 of its bytes and its geometry only.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

from schemas.chest_ct import CT_IDS, LOBES
from schemas.errors import SpecError
from schemas.source import CTSource, SourceUnit

C = CT_IDS
# A CT volume in HU: air near -1000, some lung/air below -500, and nothing beyond what reconstructions output.
HU_FLOOR, HU_CEIL = -1100.0, 4000.0
PADDING_BELOW = -1500.0  # outside-the-field-of-view padding (-2000, -3024): set to air, not refused


@dataclass
class Scan:
    """One source scan in HU, display orientation, with the user's labels mapped to pairforge class ids."""

    source_id: str
    sha256: str
    kind: str
    hu: np.ndarray  # float32 (Z, H, W)
    spacing_mm: float  # in-plane (square pixels)
    slice_mm: float | None
    labels: np.ndarray | None  # uint8 (Z, H, W) pairforge class ids, or None
    geometry: dict[str, Any] = field(default_factory=dict)


def _refuse(path: str, why: str) -> SpecError:
    return SpecError(f"source scan {path}: {why}")


def _check_hu(path: str, hu: np.ndarray) -> np.ndarray:
    if not np.isfinite(hu).all():
        raise _refuse(path, "holds NaN or infinite values; accepted: CT in Hounsfield units")
    hu = np.where(hu < PADDING_BELOW, -1024.0, hu).astype(np.float32)
    lo, hi = float(np.percentile(hu, 0.5)), float(np.percentile(hu, 99.5))
    if lo < HU_FLOOR or hi > HU_CEIL or float((hu < -500).mean()) < 0.005:
        raise _refuse(path, f"values {lo:.0f} to {hi:.0f} (0.5th-99.5th percentile) are not a chest CT in Hounsfield "
                            f"units; accepted: {HU_FLOOR:g} to {HU_CEIL:g} HU with some air or lung below -500 HU")
    return hu


def _read_nifti(path: str) -> tuple[np.ndarray, float, float | None, dict]:
    import nibabel as nib

    try:
        img = nib.load(path)
        img = nib.as_closest_canonical(img)  # RAS+
        data = np.asarray(img.dataobj, dtype=np.float32)
        zooms = [round(float(z), 6) for z in img.header.get_zooms()[:3]]
    except Exception as e:  # nibabel raises many types for broken files
        raise _refuse(path, f"cannot be read as NIfTI ({type(e).__name__}); accepted: .nii or .nii.gz volumes") from None
    if data.ndim == 2:
        data = data[:, :, None]
        zooms = zooms[:2] + [0.0]
    if data.ndim != 3:
        raise _refuse(path, f"has {data.ndim} dimensions; accepted: a 3-D volume or a 2-D slice")
    if len(zooms) < 2 or zooms[0] <= 0 or zooms[1] <= 0:
        raise _refuse(path, "has no voxel spacing in its header; accepted: NIfTI with pixdim set in mm")
    if abs(zooms[0] - zooms[1]) > 0.01 * zooms[0]:
        raise _refuse(path, f"in-plane voxels {zooms[0]:g} x {zooms[1]:g} mm are not square; accepted: square pixels")
    # RAS: x to the patient's right... left; display wants columns toward the patient's left, rows posterior.
    vol = data[::-1, ::-1, :].transpose(2, 1, 0)
    geo = {"shape_xyz": list(data.shape), "voxel_mm": zooms[:3], "orientation": "RAS (closest canonical)"}
    return np.ascontiguousarray(vol), zooms[0], (zooms[2] if len(zooms) > 2 and zooms[2] > 0 else None), geo


def _read_dicom(files: tuple[str, ...]) -> tuple[np.ndarray, float, float | None, dict]:
    import pydicom

    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
            modality = str(ds.get("Modality", "")).upper()
        except Exception as e:
            raise _refuse(f, f"is not readable DICOM ({type(e).__name__})") from None
        if modality != "CT":
            raise _refuse(f, f"modality is {modality or 'missing'}; accepted: CT")
        if "PixelSpacing" not in ds:
            raise _refuse(f, "has no PixelSpacing; accepted: CT images with pixel spacing")
        try:
            px = ds.pixel_array.astype(np.float32)
        except Exception as e:
            raise _refuse(f, f"pixel data cannot be decoded ({type(e).__name__})") from None
        if px.ndim != 2:
            raise _refuse(f, f"holds a {px.ndim}-D pixel array; accepted: one 2-D CT image per file")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        inter = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        ori = np.array([float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])])
        pos = np.array([float(v) for v in ds.get("ImagePositionPatient", [0, 0, float(ds.get("InstanceNumber", 0))])])
        rs, cs = [float(v) for v in ds.PixelSpacing]
        slices.append((f, px * slope + inter, ori, pos, rs, cs, float(ds.get("SliceThickness", 0) or 0)))
    f0, _, ori, _, rs, cs, thick = slices[0]
    if rs <= 0 or cs <= 0:
        raise _refuse(f0, "has a non-positive PixelSpacing")
    if abs(rs - cs) > 0.01 * rs:
        raise _refuse(f0, f"pixels {rs:g} x {cs:g} mm are not square; accepted: square pixels")
    row_dir, col_dir = ori[:3], ori[3:]
    flip = None
    if np.allclose(row_dir, [1, 0, 0], atol=0.05) and np.allclose(col_dir, [0, 1, 0], atol=0.05):
        flip = False
    elif np.allclose(row_dir, [-1, 0, 0], atol=0.05) and np.allclose(col_dir, [0, -1, 0], atol=0.05):
        flip = True
    if flip is None:
        raise _refuse(f0, f"orientation {ori.round(3).tolist()} is not axial; accepted: axial CT series")
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda s: float(np.dot(s[3], normal)))
    shapes = {s[1].shape for s in slices}
    if len(shapes) > 1:
        raise _refuse(str(Path(f0).parent), f"slices differ in size {sorted(shapes)}; accepted: one series per folder")
    vol = np.stack([s[1] for s in slices])
    if flip:
        vol = vol[:, ::-1, ::-1]
    z = np.array([float(np.dot(s[3], normal)) for s in slices])
    slice_mm = float(np.median(np.diff(z))) if len(z) > 1 else (thick or None)
    if len(z) > 1 and slice_mm <= 0:
        raise _refuse(str(Path(f0).parent), "slices share one position; accepted: one series per folder")
    geo = {"shape_zyx": list(vol.shape), "pixel_mm": [rs, cs], "slice_mm": slice_mm,
           "orientation": ori.round(4).tolist(), "slices": len(slices)}
    return np.ascontiguousarray(vol), rs, slice_mm, geo


def _read_png(files: tuple[str, ...], src: CTSource) -> tuple[np.ndarray, float, float | None, dict]:
    planes = []
    for f in files:
        a = cv2.imread(f, cv2.IMREAD_UNCHANGED)
        if a is None:
            raise _refuse(f, "cannot be read as PNG")
        if a.dtype != np.uint16 or a.ndim != 2:
            raise _refuse(f, f"is {a.dtype} with {a.ndim} dimensions; accepted: 16-bit greyscale PNG (HU + "
                             f"{src.png_hu_offset:g})")
        planes.append(a.astype(np.float32) - src.png_hu_offset)
    if len({p.shape for p in planes}) > 1:
        raise _refuse(str(Path(files[0]).parent), "PNG slices differ in size; accepted: one volume per folder")
    vol = np.stack(planes)
    geo = {"shape_zyx": list(vol.shape), "pixel_mm": src.spacing_mm, "slice_mm": src.slice_thickness_mm}
    return vol, float(src.spacing_mm), src.slice_thickness_mm, geo


def _mask_file(unit: SourceUnit, masks: str) -> list[Path] | None:
    root = Path(masks).expanduser()
    stem = Path(unit.path).name
    for suf in (".nii.gz", ".nii"):
        stem = stem[: -len(suf)] if stem.lower().endswith(suf) else stem
    if unit.kind == "png":
        d = root / stem
        files = [d / Path(f).name for f in unit.files]
        return files if all(f.is_file() for f in files) else None
    for cand in (root / f"{stem}.nii.gz", root / f"{stem}.nii", root / f"{stem}_mask.nii.gz"):
        if cand.is_file():
            return [cand]
    return None


def _read_labels(unit: SourceUnit, src: CTSource, shape: tuple[int, int, int]) -> np.ndarray | None:
    if src.masks is None:
        return None
    files = _mask_file(unit, src.masks)
    if files is None:  # masks are optional per scan: this one gets a computed lung mask
        return None
    if unit.kind == "png":
        vol = np.stack([cv2.imread(str(f), cv2.IMREAD_UNCHANGED) for f in files]).astype(np.int64)
    else:
        vol = np.rint(_read_nifti(str(files[0]))[0]).astype(np.int64)
    if vol.shape != shape:
        raise SpecError(f"label map {files[0]}: shape {vol.shape} differs from its scan {shape}; accepted: the "
                        "scan's own grid")
    lut_keys = np.unique(vol)
    out = np.zeros(vol.shape, np.uint8)
    for v in lut_keys:
        if v == 0:
            continue
        name_ = src.mask_classes.get(int(v))
        if name_ is None:
            raise SpecError(f"label map {files[0]}: value {int(v)} is not in source.mask_classes; accepted values: "
                            f"{', '.join(str(k) for k in sorted(src.mask_classes))}")
        out[vol == v] = C[name_]
    return out


@functools.lru_cache(maxsize=4)
def _load_cached(unit: SourceUnit, src_json: str) -> Scan:
    src = CTSource.model_validate_json(src_json)
    if unit.kind == "nifti":
        vol, sp, sl, geo = _read_nifti(unit.path)
    elif unit.kind == "dicom":
        vol, sp, sl, geo = _read_dicom(unit.files)
    else:
        vol, sp, sl, geo = _read_png(unit.files, src)
    vol = _check_hu(unit.path, vol)
    labels = _read_labels(unit, src, vol.shape)
    geo = {**geo, "format": unit.kind, "files": len(unit.files)}
    return Scan(source_id=unit.source_id, sha256=unit.sha256, kind=unit.kind, hu=vol, spacing_mm=float(sp),
                slice_mm=sl, labels=labels, geometry=geo)


def load_scan(unit: SourceUnit, src: CTSource) -> Scan:
    """The scan of ``unit`` (cached per process: a shard reads each source once). SpecError naming the file."""
    return _load_cached(unit, src.model_dump_json())


def check_sources(src: CTSource) -> None:
    """Open every source scan before anything is generated: unreadable, non-CT, spacing-less or out-of-range scans
    are refused with one line naming the file."""
    for u in src.units:
        scan = load_scan(u, src)
        if src.lobes == "approximate" and scan.hu.shape[0] == 1 and src.level is None:
            raise SpecError(f"source scan {u.path}: a single slice has no craniocaudal extent for approximate lobes; "
                            "give source.level (0 apex .. 1 base)")


# ------------------------------------------------------------------------------------------------ lungs
def lung_sides(hu: np.ndarray, spacing: float) -> np.ndarray:
    """Lung mask of one axial slice, by side: 0 none, 1 right lung, 2 left lung (radiological: right on the left).

    The rule: smooth (0.7 mm), threshold below -400 HU, connected components (8-neighbour); drop components under
    50 mm^2 and those whose median HU is below -960 (air outside the body, trachea, bowel gas); fill each kept
    component's holes (vessels, nodules) and close gaps under 2 mm; a component's side is where its centroid lies
    relative to the body's midline, and one that crosses the midline (joined lungs) is cut there."""
    s = cv2.GaussianBlur(hu, (0, 0), max(0.5, 0.7 / spacing))
    cand = (s < -400).astype(np.uint8)
    n, lab, stats, cent = cv2.connectedComponentsWithStats(cand, connectivity=8)
    h, w = hu.shape
    body = (s > -500).astype(np.uint8)
    cols = np.nonzero(body.any(0))[0]
    mid = (cols.min() + cols.max()) / 2 if cols.size else w / 2
    out = np.zeros((h, w), np.uint8)
    r = max(1, int(round(2.0 / spacing)))
    close_k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    min_px = 50.0 / spacing ** 2
    xs = np.arange(w)[None, :]
    for k in range(1, n):
        if stats[k, cv2.CC_STAT_AREA] < min_px:
            continue
        comp = lab == k
        if float(np.median(hu[comp])) < -960:
            continue
        filled = ndimage.binary_fill_holes(cv2.morphologyEx(comp.astype(np.uint8), cv2.MORPH_CLOSE, close_k) > 0)
        right_share = float((filled & (xs < mid)).sum()) / max(1, int(filled.sum()))
        if 0.2 < right_share < 0.8:  # joined across the midline
            out[filled & (xs < mid)] = 1
            out[filled & (xs >= mid)] = 2
        else:
            out[filled & (out == 0)] = 1 if right_share >= 0.5 else 2
    return out


def approximate_lobes(sides: np.ndarray, level: float) -> np.ndarray:
    """Lobes by the phantom's geometric rule (an approximation, recorded as such): within each lung's bounding box,
    ``v`` runs anterior -> posterior and ``u`` medial -> lateral; the oblique fissure is the line
    v = p(level) - 0.32 (u - 0.5) + 0.1 (u - 0.5)^2 with p falling from 1.4 at the apex to 0.2 at the base; behind it
    is the lower lobe, in front the upper lobe (right: the middle lobe at levels >= 0.52)."""
    out = np.zeros(sides.shape, np.uint8)
    for side, val in (("right", 1), ("left", 2)):
        m = sides == val
        if not m.any():
            continue
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        v = (yy - y0 + 0.5) / (y1 - y0)
        u = (x1 - xx - 0.5) / (x1 - x0) if side == "right" else (xx - x0 + 0.5) / (x1 - x0)
        z = level + (0.03 if side == "left" else 0.0)
        p = float(np.interp(z, [0, 0.3, 0.42, 0.6, 0.8, 1.0], [1.4, 1.08, 0.8, 0.55, 0.34, 0.2]))
        lower = v > p - 0.32 * (u - 0.5) + 0.1 * (u - 0.5) ** 2
        box = out[y0:y1, x0:x1]
        mm = m[y0:y1, x0:x1]
        if side == "right":
            box[mm & ~lower] = LOBES["RML"] if level >= 0.52 else LOBES["RUL"]
            box[mm & lower] = LOBES["RLL"]
        else:
            box[mm & ~lower] = LOBES["LUL"]
            box[mm & lower] = LOBES["LLL"]
    return out


def vessel_mask(hu: np.ndarray, lung: np.ndarray, spacing: float) -> np.ndarray:
    """Structures inside the lung denser than -650 HU after a 0.4 mm blur (vessels down to the thin, partial-volumed
    ones, airway walls, pleura, existing nodules; lung is -950 to -750), grown by 1 px."""
    s = cv2.GaussianBlur(hu, (0, 0), max(0.3, 0.4 / spacing))
    v = ((s > -650) & lung).astype(np.uint8)
    return cv2.dilate(v, np.ones((3, 3), np.uint8)) > 0


def estimate_edge_blur(hu: np.ndarray, lung: np.ndarray, default_px: float = 0.35) -> float:
    """The scanner's blur (Gaussian sigma, px) from the lung's edges against soft tissue: a step of height D blurred
    by sigma has a peak gradient D / (sigma sqrt(2 pi)); the pixel's own box (sigma^2 = 1/12) is taken out, since
    insertion models it separately. ``default_px`` when the slice shows fewer than 30 such edge pixels."""
    lm = lung.astype(np.uint8)
    edge = (cv2.dilate(lm, np.ones((3, 3), np.uint8)) > 0) & ~lung
    edge &= cv2.dilate((hu > -200).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    core = cv2.erode(lm, np.ones((7, 7), np.uint8)) > 0
    outside = (cv2.dilate(lm, np.ones((9, 9), np.uint8)) > 0) & ~(cv2.dilate(lm, np.ones((5, 5), np.uint8)) > 0)
    outside &= hu > -300
    if edge.sum() < 30 or not core.any() or not outside.any():
        return default_px
    gy, gx = np.gradient(hu.astype(np.float32))
    peak = float(np.median(cv2.dilate(np.hypot(gx, gy), np.ones((5, 5), np.uint8))[edge]))
    step = float(np.median(hu[outside]) - np.median(hu[core]))
    if peak <= 0 or step <= 0:
        return default_px
    sigma = step / (math.sqrt(2 * math.pi) * peak)
    return float(min(2.5, max(default_px, math.sqrt(max(0.0, sigma ** 2 - 1 / 12)))))


# ------------------------------------------------------------------------------------------------ noise
@dataclass
class NoiseModel:
    """Noise of the lung parenchyma of one slice: std (HU) of plane-detrended ROIs and their mean 2-D NPS."""

    std_hu: float
    nps: np.ndarray  # (n, n), HU^2 mm^2, unshifted FFT order
    roi_px: int
    n_rois: int
    spacing_mm: float
    mean_frequency: float  # cycles/mm, NPS-weighted mean radial frequency

    def record(self) -> dict[str, Any]:
        f, prof = radial_profile(self.nps, self.spacing_mm)
        return {"std_hu": round(self.std_hu, 3), "roi_px": self.roi_px, "n_rois": self.n_rois,
                "mean_frequency_per_mm": round(self.mean_frequency, 5),
                "nps_radial_per_mm": [round(float(x), 4) for x in f],
                "nps_radial_hu2mm2": [round(float(x), 4) for x in prof]}


def detrend_plane(values: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Values minus their least-squares plane a + b x + c y (the local mean)."""
    A = np.stack([np.ones_like(xs, dtype=np.float64), xs, ys], 1)
    coef, *_ = np.linalg.lstsq(A, values.astype(np.float64), rcond=None)
    return (values - A @ coef).astype(np.float64)


def mean_frequency(nps: np.ndarray, spacing: float) -> float:
    n0, n1 = nps.shape
    fy = np.fft.fftfreq(n0, spacing)[:, None]
    fx = np.fft.fftfreq(n1, spacing)[None, :]
    f = np.hypot(fx, fy)
    tot = float(nps.sum())
    return float((f * nps).sum() / tot) if tot > 0 else 0.0


def radial_profile(nps: np.ndarray, spacing: float, bins: int = 12) -> tuple[np.ndarray, np.ndarray]:
    n0, n1 = nps.shape
    f = np.hypot(np.fft.fftfreq(n0, spacing)[:, None], np.fft.fftfreq(n1, spacing)[None, :])
    edges = np.linspace(0, f.max() + 1e-9, bins + 1)
    idx = np.clip(np.digitize(f, edges) - 1, 0, bins - 1)
    s = np.bincount(idx.ravel(), nps.ravel(), bins)
    c = np.bincount(idx.ravel(), minlength=bins)
    return (edges[:-1] + edges[1:]) / 2, s / np.maximum(c, 1)


def estimate_noise(hu: np.ndarray, clean: np.ndarray, spacing: float) -> NoiseModel:
    """Std and NPS of the parenchyma from square ROIs wholly inside ``clean`` (lung off vessels), each detrended by
    its plane; the ROI size is the largest of 32/24/16/12/8 px giving at least 6 ROIs."""
    for n in (32, 24, 16, 12, 8):
        ii = cv2.integral(clean.astype(np.uint8))
        step = max(2, n // 2)
        rois = []
        for y in range(0, hu.shape[0] - n + 1, step):
            for x in range(0, hu.shape[1] - n + 1, step):
                if ii[y + n, x + n] - ii[y, x + n] - ii[y + n, x] + ii[y, x] == n * n:
                    rois.append((y, x))
        if len(rois) >= 6 or n == 8:
            break
    if not rois:
        raise SpecError("no parenchyma free of vessels to estimate noise from")
    yy, xx = np.mgrid[0:n, 0:n]
    ys, xs = yy.ravel().astype(np.float64), xx.ravel().astype(np.float64)
    acc = np.zeros((n, n))
    var = 0.0
    for y, x in rois:
        d = hu[y:y + n, x:x + n].astype(np.float64)
        d = d - d.mean()
        var += float((d ** 2).mean())
        acc += np.abs(np.fft.fft2(d)) ** 2
    nps = acc / len(rois) * spacing * spacing / (n * n)
    return NoiseModel(std_hu=math.sqrt(var / len(rois)), nps=nps, roi_px=n, n_rois=len(rois), spacing_mm=spacing,
                      mean_frequency=mean_frequency(nps, spacing))


def synthesize_noise(shape: tuple[int, int], model: NoiseModel, rng: np.random.Generator) -> np.ndarray:
    """A zero-mean noise field with the model's 2-D NPS (interpolated onto the field's frequency grid) and std."""
    m = int(2 ** math.ceil(math.log2(max(shape[0], shape[1], model.roi_px))))
    n = model.roi_px
    nps = model.nps.copy()
    # Detrending empties the zero-frequency bin; refill it from its neighbours so interpolation near zero
    # frequency does not lose the low-frequency power the parenchyma has.
    nps[0, 0] = (nps[0, 1] + nps[1, 0] + nps[0, -1] + nps[-1, 0]) / 4
    # Frequencies of the m-grid, in units of the n-grid's frequency step, wrapped into the n-grid (periodic).
    fm = np.fft.fftfreq(m) * n
    gy, gx = np.meshgrid(fm, fm, indexing="ij")
    amp = ndimage.map_coordinates(np.sqrt(nps), [gy % n, gx % n], order=1, mode="grid-wrap")
    amp[0, 0] = 0.0
    white = rng.standard_normal((m, m))
    field_ = np.real(np.fft.ifft2(np.fft.fft2(white) * amp))
    field_ = field_[: shape[0], : shape[1]]
    return (field_ * (model.std_hu / (field_.std() + 1e-9))).astype(np.float32)
