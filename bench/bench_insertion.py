"""Nodule insertion into real scans: size, placement and noise match over many insertions.

Sources: pydicom's real chest-CT slice (CT_small, 0.66 mm; lungs from the computed mask, left/right locations)
and phantom volumes written as NIfTI and as a DICOM series and read back (lobes from a label map). Each trial
places one finding (kind, margin, size, location, sometimes juxtapleural/juxtavascular) and inserts it three ways
from the same placement: pairforge's NPS-matched insertion, a plain smooth disc, and a disc with white noise of the
parenchyma's std. Checks: |equivalent diameter - request| <= max(0.5 mm, 1 px); >= 99 % of the 2 mm ring in the
requested region (not for juxtapleural); no vessel overlap (not for juxtavascular); pooled noise std and NPS mean
frequency of the inserted regions within +-10 % of the surrounding parenchyma's.

    OMP_NUM_THREADS=1 python bench/bench_insertion.py [--trials 360] [--out docs/insertion_bench.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from annotators.ct_insertion import (annotate_insertion, inner_region, mean_frequency,  # noqa: E402
                                     noise_measure)
from bench.scan_fixtures import (LOBE_MASK_CLASSES, PHANTOM_SLICE_MM, PHANTOM_SPACING, ct_small_path,  # noqa: E402
                                 lobe_mask, phantom_volume, write_dicom_series, write_nifti)
from generators.ct_insert import MODES, insert_intensities, place_findings, scan_context  # noqa: E402
from generators.ct_sources import load_scan  # noqa: E402
from schemas.chest_ct import LOBES  # noqa: E402
from schemas.errors import PlacementError  # noqa: E402
from schemas.sample import Layout, SampleRequest  # noqa: E402
from schemas.source import CTSource  # noqa: E402
from schemas.spec import QCSpec  # noqa: E402


def slices(tmp: Path) -> list[dict]:
    """Every slice the bench inserts into, each with its insertion context (read back from files)."""
    out = []
    src = CTSource(path=ct_small_path())
    scan = load_scan(src.units[0], src)
    out.append({"name": "CT_small (real, DICOM)", "hu": scan.hu[0], "sp": scan.spacing_mm,
                "ctx": scan_context(scan.hu[0], scan.spacing_mm), "locations": ["right", "left", "any"],
                "sizes": (3.0, 7.0)})
    for i, fmt in enumerate(("nifti", "dicom")):
        hu, lab = phantom_volume(seed=10 + i, n_slices=3)
        mask = lobe_mask(lab)
        if fmt == "nifti":
            write_nifti(tmp / f"p{i}.nii.gz", hu, PHANTOM_SPACING, PHANTOM_SLICE_MM)
            path = tmp / f"p{i}.nii.gz"
        else:
            write_dicom_series(tmp / f"p{i}", hu, PHANTOM_SPACING, PHANTOM_SLICE_MM)
            path = tmp / f"p{i}"
        (tmp / f"masks{i}").mkdir()
        write_nifti(tmp / f"masks{i}" / f"p{i}.nii.gz", mask, PHANTOM_SPACING, PHANTOM_SLICE_MM, np.uint8)
        src = CTSource(path=str(path), masks=str(tmp / f"masks{i}"), mask_classes=LOBE_MASK_CLASSES, lobes="masks")
        scan = load_scan(src.units[0], src)
        for k in range(scan.hu.shape[0]):
            ctx = scan_context(scan.hu[k], scan.spacing_mm, scan.labels[k], "masks")
            present = [n for n, v in LOBES.items() if (ctx["region"] == v).sum() > 2000]
            out.append({"name": f"phantom {fmt} slice {k}", "hu": scan.hu[k], "sp": scan.spacing_mm, "ctx": ctx,
                        "locations": present + ["right", "left", "any"], "sizes": (3.0, 12.0)})
    return out


def trial_finding(s: dict, rng: np.random.Generator, t: int) -> dict:
    kind = ("solid", "ground_glass", "part_solid")[t % 3]
    margin = ("smooth", "lobulated", "spiculated")[(t // 3) % 3]
    lo, hi = s["sizes"]
    f = {"kind": kind, "diameter_mm": round(float(rng.uniform(lo, hi)), 3),
         "location": s["locations"][int(rng.integers(len(s["locations"])))], "margin": margin,
         "juxtapleural": False}
    if t % 10 == 7:
        f["juxtapleural"] = True
    elif t % 10 == 8:
        f["juxtavascular"] = True
    return f


def run(trials: int) -> dict:
    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    sl = slices(tmp)
    records, noise = [], {m: [] for m in MODES}
    no_room = 0
    qc = QCSpec()
    for t in range(trials):
        s = sl[t % len(sl)]
        rng = np.random.default_rng([7, t])
        f = trial_finding(s, rng, t)
        ctx = s["ctx"]
        label, instance = ctx["label"].copy(), np.zeros(s["hu"].shape, np.uint16)
        try:
            placed = place_findings(ctx["region"], ctx["vessels"], [f], s["sp"], rng, label, instance)
        except PlacementError:
            no_room += 1
            continue
        clean = ctx["clean"] & (instance == 0)
        for mode in MODES:
            img, iparams = insert_intensities(s["hu"], ctx["clean"], placed, s["sp"], ctx["noise"],
                                        np.random.default_rng([8, t]), mode,
                                        ctx["psf_sigma_px"])
            if mode == "matched":
                lay = Layout(label=label, instance=instance, spacing_mm=s["sp"], findings=placed,
                             params={"psf_sigma_px": ctx["psf_sigma_px"]},
                             extras={"region": ctx["region"], "vessels": ctx["vessels"], "clean": ctx["clean"]})
                req = SampleRequest(index=t, sample_id=str(t), split="train", domain="chest_ct", spacing_mm=s["sp"],
                                    size=s["hu"].shape, findings=[f])
                m = annotate_insertion(img, lay, req, qc).measured[0]
                tol = max(0.5, s["sp"])
                records.append({
                    "trial": t, "slice": s["name"], "kind": f["kind"], "margin": f["margin"],
                    "location": f["location"], "lobe": m["lobe"], "juxtapleural": f["juxtapleural"],
                    "juxtavascular": bool(f.get("juxtavascular")), "requested_mm": f["diameter_mm"],
                    "measured_mm": m["equivalent_diameter_mm"], "error_mm": round(m["equivalent_diameter_mm"] -
                                                                                  f["diameter_mm"], 4),
                    "tolerance_mm": round(tol, 4), "in_region": m["in_region_fraction"],
                    "ring_in_region": m["ring_in_region_fraction"], "vessel_overlap_px": m["vessel_overlap_px"]})
            nm = noise_measure(img, inner_region(label, instance, placed[0], ctx["psf_sigma_px"]), clean, s["sp"],
                               placed[0]["shape"]["radius_px"] + 0.75)
            if nm is not None:
                nm["kind"] = f["kind"]
                nm["calibrated"] = mode != "matched" or any("local_noise_std_hu" in q for q in iparams)
                noise[mode].append((nm, s["sp"]))
    seconds = time.perf_counter() - t0
    size_ok = [abs(r["error_mm"]) <= r["tolerance_mm"] for r in records]
    ring = [r["ring_in_region"] for r in records if not r["juxtapleural"]]
    vessel = [r["vessel_overlap_px"] for r in records if not r["juxtavascular"]]
    worst = max(records, key=lambda r: abs(r["error_mm"]) / r["tolerance_mm"])
    worst_ring = min((r for r in records if not r["juxtapleural"]), key=lambda r: r["ring_in_region"])
    result = {"trials": trials, "insertions": len(records), "no_room": no_room, "seconds": round(seconds, 1),
              "size_within_tolerance": sum(size_ok), "max_abs_error_over_tolerance":
                  round(max(abs(r["error_mm"]) / r["tolerance_mm"] for r in records), 4),
              "ring_min": min(ring), "ring_checked": len(ring), "vessel_overlap_max_px": max(vessel),
              "vessel_checked": len(vessel), "in_region_min": min(r["in_region"] for r in records),
              "worst_size_case": worst, "worst_ring_case": worst_ring, "noise": {}}
    for mode, items in noise.items():
        var_in = np.mean([n["var_in"] for n, _ in items])
        var_ref = np.mean([n["var_ref"] for n, _ in items])
        # Pool NPS per spacing (frequency axes differ); the mean frequency ratio is pixel-count weighted.
        ratios, weights = [], []
        for sp in sorted({sp for _, sp in items}):
            sel = [n for n, s_ in items if s_ == sp]
            fi = mean_frequency(sum(n["nps_in"] for n in sel), sp)
            fr = mean_frequency(sum(n["nps_ref"] for n in sel), sp)
            ratios.append(fi / fr if fr else 0.0)
            weights.append(len(sel))
        per = [math.sqrt(n["var_in"] / n["var_ref"]) for n, _ in items if n["var_ref"] > 0]
        by_kind = {k: round(math.sqrt(np.mean([n["var_in"] for n, _ in items if n["kind"] == k]) /
                                      np.mean([n["var_ref"] for n, _ in items if n["kind"] == k])), 4)
                   for k in sorted({n["kind"] for n, _ in items})}
        result["noise"][mode] = {
            "measured": len(items), "std_ratio": round(math.sqrt(var_in / var_ref), 4),
            "mean_frequency_ratio": round(float(np.average(ratios, weights=weights)), 4),
            "per_insertion_std_ratio_p10_p50_p90": [round(float(x), 3) for x in np.percentile(per, [10, 50, 90])],
            "std_ratio_by_kind": by_kind,
            "uncalibrated": sum(1 for n, _ in items if not n["calibrated"]),
            "passes": bool(abs(math.sqrt(var_in / var_ref) - 1) <= 0.1
                           and abs(float(np.average(ratios, weights=weights)) - 1) <= 0.1)}
    return result


def run_3d(trials: int) -> dict:
    """Whole-volume insertions (generators/ct_insert3d.py) into a phantom volume read back from NIfTI with its lobe
    map: volume-equivalent diameter, 2 mm shell in the requested lobe, vessel overlap, noise on the centre slice."""
    from generators.ct_insert3d import equivalent_diameter_mm, insert_nodule_3d
    from generators.ct_sources import estimate_edge_blur, estimate_noise, vessel_mask
    from scipy import ndimage

    tmp = Path(tempfile.mkdtemp())
    hu, lab = phantom_volume(seed=21, n_slices=10, levels=(0.55, 0.8))
    write_nifti(tmp / "v.nii.gz", hu, PHANTOM_SPACING, PHANTOM_SLICE_MM)
    (tmp / "m").mkdir()
    write_nifti(tmp / "m" / "v.nii.gz", lobe_mask(lab), PHANTOM_SPACING, PHANTOM_SLICE_MM, np.uint8)
    src = CTSource(path=str(tmp / "v.nii.gz"), masks=str(tmp / "m"), mask_classes=LOBE_MASK_CLASSES, lobes="masks")
    scan = load_scan(src.units[0], src)
    sp, dz = scan.spacing_mm, scan.slice_mm
    lobes = np.where(np.isin(scan.labels, list(LOBES.values())), scan.labels, 0)
    vessels = np.stack([vessel_mask(scan.hu[k], lobes[k] > 0, sp) for k in range(scan.hu.shape[0])])
    vessels |= np.isin(scan.labels, [17, 18, 19])
    mid = scan.hu.shape[0] // 2
    noise = estimate_noise(scan.hu[mid], (lobes[mid] > 0) & ~vessels[mid], sp)
    psf = estimate_edge_blur(scan.hu[mid], lobes[mid] > 0)
    records, nm_all, no_room = [], [], 0
    for t in range(trials):
        rng = np.random.default_rng([31, t])
        lobe = ("RLL", "LLL", "RUL", "LUL", "RML")[t % 5]
        f = {"kind": ("solid", "ground_glass")[t % 2], "diameter_mm": round(float(rng.uniform(4, 12)), 3),
             "margin": ("smooth", "lobulated", "spiculated")[t % 3], "location": lobe}
        region = lobes == LOBES[lobe]
        label, inst = scan.labels.copy(), np.zeros(scan.hu.shape, np.uint16)
        try:
            vol, placed = insert_nodule_3d(scan.hu, region, vessels, f, sp, dz, noise, psf, rng, label, inst)
        except PlacementError:
            no_room += 1
            continue
        m = inst == 1
        d_out = ndimage.distance_transform_edt(~m, sampling=(dz, sp, sp))
        shell = (d_out > 0) & (d_out <= 2.0)
        eq = equivalent_diameter_mm(m, sp, dz)
        records.append({"trial": t, "kind": f["kind"], "margin": f["margin"], "lobe": lobe,
                        "requested_mm": f["diameter_mm"], "measured_mm": round(eq, 4),
                        "error_mm": round(eq - f["diameter_mm"], 4), "tolerance_mm": max(0.5, sp),
                        "in_region": round(float(region[m].mean()), 5),
                        "ring_in_region": round(float(region[shell].mean()), 5),
                        "vessel_overlap_vox": int((vessels & m).sum())})
        zc = placed["center_vox"][0]
        if f["kind"] == "solid":
            nm = noise_measure(vol[zc], inner_region(label[zc], inst[zc], {"instance": 1, "kind": "solid"}, psf),
                               (lobes[zc] > 0) & ~vessels[zc] & ~m[zc], sp, placed["shape"]["radius_mm"] / sp + 0.75)
            if nm is not None:
                nm_all.append(nm)
    out = {"insertions": len(records), "no_room": no_room,
           "size_within_tolerance": sum(abs(r["error_mm"]) <= r["tolerance_mm"] for r in records),
           "worst_size_case": max(records, key=lambda r: abs(r["error_mm"])),
           "ring_min": min(r["ring_in_region"] for r in records),
           "vessel_overlap_max_vox": max(r["vessel_overlap_vox"] for r in records), "records": records}
    if nm_all:
        out["noise_std_ratio"] = round(math.sqrt(np.mean([n["var_in"] for n in nm_all]) /
                                                 np.mean([n["var_ref"] for n in nm_all])), 4)
        out["noise_mean_frequency_ratio"] = round(mean_frequency(sum(n["nps_in"] for n in nm_all), sp) /
                                                  mean_frequency(sum(n["nps_ref"] for n in nm_all), sp), 4)
        out["noise_measured"] = len(nm_all)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=360)
    ap.add_argument("--out", default=None)
    ap.add_argument("--trials-3d", type=int, default=60)
    a = ap.parse_args()
    r = run(a.trials)
    if a.trials_3d:
        r["volume_3d"] = v = run_3d(a.trials_3d)
        print(f"3-D: {v['insertions']} insertions into a phantom volume ({v['no_room']} no room); size "
              f"{v['size_within_tolerance']}/{v['insertions']} within max(0.5 mm, 1 px), worst "
              f"{json.dumps(v['worst_size_case'])}; 2 mm shell in lobe min {v['ring_min']}; vessel overlap max "
              f"{v['vessel_overlap_max_vox']} voxels; noise (solid, centre slice) std ratio {v.get('noise_std_ratio')}, "
              f"NPS mean-frequency ratio {v.get('noise_mean_frequency_ratio')} over {v.get('noise_measured')}")
    print(f"{r['insertions']} insertions ({r['no_room']} trials found no room) in {r['seconds']} s")
    print(f"size: {r['size_within_tolerance']}/{r['insertions']} within max(0.5 mm, 1 px); worst |error|/tolerance "
          f"{r['max_abs_error_over_tolerance']}: {json.dumps(r['worst_size_case'])}")
    print(f"ring in requested region: min {r['ring_min']} over {r['ring_checked']} (worst: "
          f"{json.dumps(r['worst_ring_case'])})")
    print(f"vessel overlap: max {r['vessel_overlap_max_px']} px over {r['vessel_checked']}; nodule pixels in region: "
          f"min {r['in_region_min']}")
    for mode, n in r["noise"].items():
        print(f"noise [{mode}]: std ratio {n['std_ratio']}, NPS mean-frequency ratio {n['mean_frequency_ratio']} over "
              f"{n['measured']} insertions (per-insertion std ratio p10/p50/p90 "
              f"{n['per_insertion_std_ratio_p10_p50_p90']}; by kind {n['std_ratio_by_kind']}) -> "
              f"{'PASS' if n['passes'] else 'FAIL'} (+-10 %)")
    if a.out:
        Path(a.out).write_text(json.dumps(r, indent=1, default=str))


if __name__ == "__main__":
    main()
