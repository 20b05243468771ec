"""Downstream utility of a dataset as plain functions: score a segmenter on labelled images (Dice per class, Dice
per finding by size), and the train-on-synthetic / augmentation experiment — a segmenter trained on k real images
alone vs k real + N synthetic, tested on held-out real images, repeated over seeds. The caller decides how runs are
executed (in turn, in a process pool, as Prefect tasks) by passing ``map_fn``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from annotators.evaluation import EvalProfile, dice_per_class, finding_dice, group_labels, mean_ci
from annotators.segmenter import Segmenter, SegmenterConfig, train_segmenter


@dataclass
class LabelledSet:
    """Images with their domain label maps (ids of the class table) and finding instances."""

    images: list[np.ndarray]
    labels: list[np.ndarray]
    instances: list[np.ndarray]
    spacings: list[float]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: Iterable[int]) -> "LabelledSet":
        idx = list(idx)
        return LabelledSet([self.images[i] for i in idx], [self.labels[i] for i in idx],
                           [self.instances[i] for i in idx], [self.spacings[i] for i in idx],
                           [self.ids[i] for i in idx])

    def __add__(self, other: "LabelledSet") -> "LabelledSet":
        return LabelledSet(self.images + other.images, self.labels + other.labels, self.instances + other.instances,
                           self.spacings + other.spacings, self.ids + other.ids)


def class_names(profile: EvalProfile) -> list[str]:
    return ["background", *profile.seg_groups]


def train_on(data: LabelledSet, profile: EvalProfile, cfg: SegmenterConfig) -> Segmenter:
    names = class_names(profile)
    return train_segmenter(data.images, [group_labels(lab, profile.seg_groups) for lab in data.labels],
                           data.spacings, names, profile.windows, cfg,
                           finding_class=names.index(profile.finding_group))


def score(seg: Segmenter, data: LabelledSet, profile: EvalProfile, keep_predictions: bool = False) -> dict[str, Any]:
    """Dice per class (mean over images where the class is present in label or prediction), and per finding
    (Dice in the finding's neighbourhood) with its equivalent diameter; findings >= ``small_finding_mm`` apart."""
    names = class_names(profile)
    fcls = names.index(profile.finding_group)
    per_image, findings, preds = [], [], []
    for i in range(len(data)):
        tgt = group_labels(data.labels[i], profile.seg_groups)
        pred = seg.predict(data.images[i], data.spacings[i])
        per_image.append(dice_per_class(pred, tgt, len(names)))
        for k, d in finding_dice(pred, tgt, data.instances[i], fcls):
            area = int((data.instances[i] == k).sum())
            findings.append({"image": i, "id": data.ids[i], "instance": k, "dice": round(d, 4),
                             "diameter_mm": round(2 * float(np.sqrt(area / np.pi)) * data.spacings[i], 3)})
        if keep_predictions:
            preds.append(pred)
    arr = np.array(per_image, float)
    with np.errstate(all="ignore"):
        per_class = {n: (None if np.isnan(arr[:, j]).all() else round(float(np.nanmean(arr[:, j])), 4))
                     for j, n in enumerate(names[1:])}
    big = [f["dice"] for f in findings if f["diameter_mm"] >= profile.small_finding_mm]
    small = [f["dice"] for f in findings if f["diameter_mm"] < profile.small_finding_mm]
    out = {"dice_per_class": per_class, "per_image": arr.tolist(), "findings": findings,
           f"finding_dice_ge_{profile.small_finding_mm:g}mm": round(float(np.mean(big)), 4) if big else None,
           f"finding_dice_lt_{profile.small_finding_mm:g}mm": round(float(np.mean(small)), 4) if small else None,
           "n_findings_ge": len(big), "n_findings_lt": len(small)}
    if keep_predictions:
        out["predictions"] = preds
    return out


@dataclass(frozen=True)
class UtilityRun:
    arm: str          # "real", "real+synthetic" or "synthetic" (TSTR)
    k: int            # real training images
    n_synthetic: int
    seed: int


def plan_utility(ks: Sequence[int], seeds: Sequence[int], n_synthetic: int, tstr: bool = True) -> list[UtilityRun]:
    runs = []
    if tstr:
        runs += [UtilityRun("synthetic", 0, n_synthetic, s) for s in seeds]
    for k in ks:
        for s in seeds:
            runs.append(UtilityRun("real", k, 0, s))
            runs.append(UtilityRun("real+synthetic", k, n_synthetic, s))
    return runs


def run_utility(run: UtilityRun, real_train: LabelledSet, real_test: LabelledSet, synthetic: LabelledSet,
                profile: EvalProfile, cfg: SegmenterConfig, extra_tests: dict[str, LabelledSet] | None = None
                ) -> dict[str, Any]:
    """One arm of the experiment: draw k real training images and N synthetic ones from the run's seed, train,
    score on the held-out real images (and on each of ``extra_tests``, reported under ``"extra"``)."""
    rng = np.random.default_rng(np.random.SeedSequence([run.seed, run.k, run.n_synthetic, 7]))
    parts = []
    if run.k:
        parts.append(real_train.subset(rng.choice(len(real_train), min(run.k, len(real_train)), replace=False)))
    if run.n_synthetic:
        parts.append(synthetic.subset(rng.choice(len(synthetic), min(run.n_synthetic, len(synthetic)),
                                                 replace=False)))
    data = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    seg = train_on(data, profile, replace(cfg, seed=int(rng.integers(0, 2**31 - 1))))
    s = score(seg, real_test, profile)
    s.pop("per_image")
    out = {"arm": run.arm, "k": run.k, "n_synthetic": run.n_synthetic, "seed": run.seed,
           "final_loss": float(np.mean(seg.history[-20:])), **s}
    if extra_tests:
        out["extra"] = {}
        for name, test in extra_tests.items():
            e = score(seg, test, profile)
            e.pop("per_image")
            out["extra"][name] = e
    return out


def summarise_utility(results: list[dict[str, Any]], profile: EvalProfile, confidence: float = 0.95
                      ) -> list[dict[str, Any]]:
    """Per (arm, k): mean and confidence interval over seeds of each class's Dice and of the finding Dice."""
    key = f"finding_dice_ge_{profile.small_finding_mm:g}mm"
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        groups.setdefault((r["arm"], r["k"]), []).append(r)
    rows = []
    for (arm, k), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        row = {"arm": arm, "k": k, "n_synthetic": rs[0]["n_synthetic"], "seeds": len(rs),
               key: mean_ci([r[key] for r in rs], confidence)}
        for c in class_names(profile)[1:]:
            row[c] = mean_ci([r["dice_per_class"][c] for r in rs], confidence)
        rows.append(row)
    return rows


def utility_study(real_train: LabelledSet, real_test: LabelledSet, synthetic: LabelledSet, profile: EvalProfile,
                  cfg: SegmenterConfig, ks: Sequence[int], seeds: Sequence[int], n_synthetic: int,
                  map_fn: Callable[[Callable, list], Iterable] | None = None, tstr: bool = True) -> dict[str, Any]:
    runs = [r for r in plan_utility(ks, seeds, n_synthetic, tstr) if r.k <= len(real_train)]
    fn = lambda r: run_utility(r, real_train, real_test, synthetic, profile, cfg)  # noqa: E731
    results = list(map_fn(fn, runs) if map_fn else map(fn, runs))
    return {"runs": results, "summary": summarise_utility(results, profile), "ks": list(ks), "seeds": list(seeds),
            "n_synthetic": n_synthetic, "n_real_train": len(real_train), "n_real_test": len(real_test)}


__all__ = ["LabelledSet", "class_names", "train_on", "score", "UtilityRun", "plan_utility", "run_utility",
           "summarise_utility", "utility_study"]
