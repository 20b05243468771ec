"""Geometric accuracy of 3D nodules over many small chest-CT volumes (crops centred in the requested lobe).

Spacings 0.5-1.0 mm in-plane and 0.625-2.5 mm in z, diameters 3-30 mm (log-uniform), every kind, margin and
lobe, 10 % juxtapleural, 10 % of the rest juxtavascular. Checks per finding, from the label alone:
|volume-equivalent diameter - request| <= max(0.5 mm, one in-plane voxel); share of the one-voxel shell (face
neighbours) round the nodule inside the requested lobe >= 0.99 (vessels and airways set aside); no contact with
the pleura or a fissure unless juxtapleural; every juxtapleural finding touching the pleura, juxtavascular ones
touching a vessel (the label's face shell, schemas.volume_contact, the rule placement uses too). Prints the worst
case of each. Layout only (the renderer does not move labels).

    python bench/bench_volume_accuracy.py [--volumes 200] [--seed 0] [--only-juxtapleural | --only-juxtavascular]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from annotators.ct_volume import measure_volume_findings  # noqa: E402
from generators.volume_pipeline import VolumeRequest, layout_volume  # noqa: E402
from schemas.errors import PlacementError  # noqa: E402
from schemas.volume_contact import shell_contact  # noqa: E402

LOBES = ["RUL", "RML", "RLL", "LUL", "LLL"]


def request_for(i: int, seed: int) -> tuple[VolumeRequest, np.random.Generator]:
    r = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i, 0)))
    sx = float(r.uniform(0.5, 1.0))
    sz = float(r.uniform(0.625, 2.5))
    d = float(np.exp(r.uniform(math.log(3), math.log(30))))
    lobe = LOBES[int(r.integers(5))]
    if lobe == "RML":
        d = min(d, 24.0)
    f = {"kind": ["solid", "part_solid", "ground_glass"][int(r.integers(3))],
         "margin": ["smooth", "lobulated", "spiculated"][int(r.integers(3))],
         "diameter_mm": round(d, 2), "location": lobe, "juxtapleural": bool(r.random() < 0.1)}
    f["juxtavascular"] = bool(not f["juxtapleural"] and r.random() < 0.1)  # drawn last: earlier draws unchanged
    ext = max(50.0, 3.0 * d + 30)
    shape = (int(math.ceil(ext / sz)), int(math.ceil(ext / sx)), int(math.ceil(ext / sx)))
    req = VolumeRequest(shape, (sz, sx, sx), findings=[f], center_on_lobe=lobe)
    return req, np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i, 1)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--volumes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only-juxtapleural", action="store_true", help="run only the juxtapleural requests")
    ap.add_argument("--only-juxtavascular", action="store_true", help="run only the juxtavascular requests")
    args = ap.parse_args()
    rows, misses = [], []
    t0 = time.perf_counter()
    for i in range(args.volumes):
        if i and i % 25 == 0:
            print(f"  {i} volumes, {time.perf_counter() - t0:.0f} s", flush=True)
        req, rng = request_for(i, args.seed)
        f = req.findings[0]
        if (args.only_juxtapleural and not f["juxtapleural"]) or (args.only_juxtavascular and not f["juxtavascular"]):
            continue
        try:
            lay = layout_volume(req, rng)
        except PlacementError as e:
            misses.append((i, f, str(e)))
            continue
        g = lay["geometry"]
        m = measure_volume_findings(lay["label"], lay["instance"], lay["lobes"], g, lay["nodules"])[0]
        tol = max(0.5, g.spacing[2])
        err = abs(m["equivalent_diameter_mm"] - f["diameter_mm"])
        touch = m["touches_pleura"] or m["touches_fissure"]
        k = lay["instance"] == 1
        vessel = shell_contact(lay["label"], k, None)["touches_vessel"]  # face contact with a vessel in the label
        rows.append({"i": i, "spacing": g.spacing, "d": f["diameter_mm"], "kind": f["kind"], "margin": f["margin"],
                     "lobe": f["location"], "juxta": f["juxtapleural"], "err": err, "ratio": err / tol,
                     "shell": m["shell_in_lobe_fraction"], "in_lobe": m["in_lobe_fraction"],
                     "bad_touch": bool(touch and not f["juxtapleural"]), "juxta_touch": bool(m["touches_pleura"]),
                     "juxtav": f["juxtavascular"], "vessel_touch": bool(vessel)})
    dt = time.perf_counter() - t0
    n = len(rows)
    worst = max(rows, key=lambda r: r["ratio"])
    shell_rows = [r for r in rows if not r["juxta"]]
    low = min(shell_rows, key=lambda r: r["shell"]) if shell_rows else None
    print(f"{args.volumes} volumes, {n} findings placed, {len(misses)} placement failures, {dt:.0f} s")
    print(f"worst |equivalent diameter - request|: {worst['err']:.3f} mm = {worst['ratio']:.2f} of its tolerance "
          f"(d {worst['d']} mm, spacing {tuple(round(s, 3) for s in worst['spacing'])}, {worst['kind']}, {worst['margin']})")
    print(f"findings within tolerance: {sum(r['ratio'] <= 1 for r in rows)}/{n}")
    if low:
        print(f"lowest share of the shell inside the requested lobe (not juxtapleural): {low['shell']:.4f} "
              f"(d {low['d']} mm, {low['lobe']}); lowest share of the nodule inside: {min(r['in_lobe'] for r in rows):.4f}")
    print(f"touching pleura or fissure without juxtapleural: {sum(r['bad_touch'] for r in rows)}; "
          f"juxtapleural findings touching the pleura: {sum(r['juxta_touch'] for r in rows if r['juxta'])}/"
          f"{sum(r['juxta'] for r in rows)}")
    jp = [(i, f) for i, f, _ in misses if f["juxtapleural"]]
    print(f"juxtapleural requests placed: {sum(r['juxta'] for r in rows)}/{sum(r['juxta'] for r in rows) + len(jp)}; "
          f"juxtavascular requests placed: {sum(r['juxtav'] for r in rows)}/"
          f"{sum(r['juxtav'] for r in rows) + sum(f['juxtavascular'] for _, f, _ in misses)}, touching a vessel "
          f"(face contact in the label): {sum(r['vessel_touch'] for r in rows if r['juxtav'])}")
    for i, f, e in misses[:5]:
        print(f"  miss {i}: {f} -> {e}")
    ok = all(r["ratio"] <= 1 for r in rows) and all(r["shell"] >= 0.99 for r in shell_rows) and \
        not any(r["bad_touch"] for r in rows) and all(r["juxta_touch"] for r in rows if r["juxta"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
