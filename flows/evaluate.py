"""``pairforge evaluate``: the evaluation flow of a published version — label fidelity, realism against a
reference, downstream utility (TSTR and augmentation) and memorisation — written as ``evaluation.json`` and a
card section with plots into the evaluation's own folder, ``<root>/_evaluations/<name>/v<N>/<stamp>/``. The
version itself is only read (through the store's verified reader) and never changes.

The flow is a recipe of calls into ``annotators.evaluation`` / ``annotators.utility`` (the metrics) and
``flows.reference`` (reading image sets); every step is a Prefect task. GPU when present, CPU otherwise.
"""
from __future__ import annotations

from flows import settings  # noqa: F401  (Prefect defaults before prefect is imported)

import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
from prefect import flow, task

from annotators import evaluation as ev
from annotators.segmenter import SegmenterConfig
from annotators.utility import LabelledSet, class_names, score, train_on, utility_study
from flows.reference import ImageSet, load_reference, load_version
from schemas.errors import SpecError

EVAL_DIR = "_evaluations"


@dataclass
class EvalOptions:
    """Knobs of an evaluation (all recorded in evaluation.json)."""

    steps: int = 400                      # segmenter training steps
    patch: int = 96
    batch: int = 8
    channels: tuple[int, ...] = (8, 16, 32, 64)
    limit: int | None = None              # at most this many samples of each set
    utility: bool = True                  # TSTR + augmentation (needs a labelled reference)
    ks: tuple[int, ...] = (10, 50, 200)
    seeds: tuple[int, ...] = (0, 1, 2)
    n_synthetic: int = 200
    features: str | None = None           # feature extractor on disk (safetensors + .json); None: segmenter's
    train_ref: str | None = None          # the generator's training data (memorisation)
    cnr_min: float = 3.0
    max_offset_px: float = 2.0
    max_failing_share: float = 0.05       # label fidelity fails above this share of failing findings
    worst: int = 6
    device: str = "auto"
    threads: int | None = None

    def segmenter(self, seed: int = 0) -> SegmenterConfig:
        return SegmenterConfig(patch=self.patch, steps=self.steps, batch=self.batch, channels=tuple(self.channels),
                               seed=seed, device=resolve_device(self.device), threads=self.threads)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


# ------------------------------------------------------------------------------------------- steps (plain functions)
def label_fidelity(version: ImageSet, profile: ev.EvalProfile, opts: EvalOptions) -> dict[str, Any]:
    """Per finding: contrast-to-noise against its ring and alignment with its label; per tissue: pixel values
    against the domain's reference ranges."""
    findings = []
    if version.volumes is not None:  # volumes: each finding against its 3-D shell
        for i, v in enumerate(version.volumes):
            for f in ev.finding_fidelity_3d(v, version.volume_labels[i], version.volume_instances[i],
                                            version.volume_spacings[i], profile, opts.cnr_min, opts.max_offset_px):
                findings.append({"sample": version.volume_ids[i], **f})
    else:
        for i in range(len(version)):
            for f in ev.finding_fidelity(version.images[i], version.labels[i], version.instances[i],
                                         version.spacings[i], profile, opts.cnr_min, opts.max_offset_px):
                findings.append({"sample": version.ids[i], **f})
    failing = [f for f in findings if not f["passed"]]
    share = len(failing) / len(findings) if findings else 0.0
    hists = ev.class_value_histograms(version.images, version.labels,
                                      {n: ids for n, (ids, _, _) in profile.reference_ranges.items()},
                                      profile.value_range)
    tissue = ev.tissue_intensity_report(hists, profile)
    cnrs = [f["cnr"] for f in findings]
    return {
        "findings": len(findings), "failing": len(failing), "failing_share": round(share, 4),
        "passed": share <= opts.max_failing_share and all(t["passed"] for t in tissue),
        "measured_in": ("3-D (shell 1-4 mm around each finding, at least 1.5 voxels of the coarsest axis)"
                        if version.volumes is not None else "2-D"),
        "criteria": f"finding cnr >= {opts.cnr_min:g} and image/label offset <= {opts.max_offset_px:g} px for all but "
                    f"{opts.max_failing_share:.0%} of findings; every tissue median inside its reference range",
        "cnr": {"median": float(np.median(cnrs)) if cnrs else None, "p05": float(np.percentile(cnrs, 5)) if cnrs else None},
        "failing_findings": failing[:50], "tissue": tissue,
    }


def learned_check(seg, version: ImageSet, profile: ev.EvalProfile, ref_score: dict | None, opts: EvalOptions
                  ) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    """The reference-trained segmenter on the version's images, Dice against their labels; overlays of the worst."""
    s = score(seg, version.labelled_set(), profile, keep_predictions=True)
    preds = s.pop("predictions")
    per_image = np.array(s.pop("per_image"), float)
    with np.errstate(all="ignore"):
        mean_img = np.nanmean(per_image, 1)
    fcls = class_names(profile).index(profile.finding_group)
    # Worst: the lowest finding Dice first (what the labels promise), then the lowest mean Dice.
    fd = {}
    for f in s["findings"]:
        fd[f["image"]] = min(fd.get(f["image"], 1.0), f["dice"])
    order = sorted(range(len(version)), key=lambda i: (fd.get(i, 2.0), np.nan_to_num(mean_img[i], nan=2.0)))
    worst = order[: opts.worst]
    overlays = [(f"worst_{r:02d}_{version.ids[i]}.png",
                 overlay_rgb(version.images[i], version.labels[i], preds[i], profile, fcls)) for r, i in enumerate(worst)]
    s["worst"] = [{"sample": version.ids[i], "finding_dice_min": fd.get(i), "mean_dice": float(mean_img[i])
                   if np.isfinite(mean_img[i]) else None} for i in worst]
    s["findings"] = s["findings"][:200]
    s["reference_test"] = None if ref_score is None else {k: v for k, v in ref_score.items()
                                                          if k not in ("findings", "per_image")}
    return s, overlays


def overlay_rgb(image: np.ndarray, label: np.ndarray, pred: np.ndarray, profile: ev.EvalProfile,
                finding_cls: int) -> np.ndarray:
    """Two panels in the display window: label outlines (green, findings yellow) | prediction outlines (red,
    findings magenta)."""
    import cv2

    c, w = profile.display_window
    g = np.clip((image - (c - w / 2)) / w * 255, 0, 255).astype(np.uint8)
    tgt = ev.group_labels(label, profile.seg_groups)
    panels = []
    for cls_map, col_other, col_find in ((tgt, (0, 200, 0), (255, 230, 0)), (pred, (230, 0, 0), (255, 0, 255))):
        rgb = cv2.cvtColor(g, cv2.COLOR_GRAY2RGB)
        for k in np.unique(cls_map):
            if k == 0:
                continue
            cs, _ = cv2.findContours((cls_map == k).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(rgb, cs, -1, col_find if k == finding_cls else col_other, 1)
        panels.append(rgb)
    return np.hstack([panels[0], np.full((g.shape[0], 4, 3), 255, np.uint8), panels[1]])


def _masks_for_realism(s: ImageSet, profile: ev.EvalProfile, by_label: bool):
    lo = profile.body_threshold
    # Uniform tissue by label where the set labels it (a real background with inserted findings may label only
    # lungs and findings), else by intensity interval inside the body.
    uniform_by_label = by_label and any(np.isin(lab, profile.uniform_ids).any() for lab in s.labels)
    bodies = None if uniform_by_label else [ev.body_mask(im, lo) if lo is not None else np.ones(im.shape, bool)
                                            for im in s.images]
    if uniform_by_label:
        uniform = [np.isin(lab, profile.uniform_ids) for lab in s.labels]
    else:  # by intensity on the image smoothed by 1.5 mm, so noise and streaks do not riddle the region
        import cv2

        a, b = profile.uniform_interval
        sm = [cv2.GaussianBlur(im.astype(np.float32), (0, 0), max(0.5, 1.5 / sp)) for im, sp in zip(s.images, s.spacings)]
        uniform = [bd & (x >= a) & (x <= b) for bd, x in zip(bodies, sm)]
    return bodies, uniform


def realism(version: ImageSet, reference: ImageSet, profile: ev.EvalProfile, features: tuple | None
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-class Wasserstein-1 (domain units), noise power spectra in uniform tissue, FID/KID of features.
    Returns (report, curves for the plots)."""
    by_label = version.labelled and reference.labelled
    hists = {}
    for name, s in (("version", version), ("reference", reference)):
        bodies, _ = _masks_for_realism(s, profile, by_label)
        if by_label:
            hists[name] = ev.class_value_histograms(s.images, s.labels, profile.histogram_classes, profile.value_range)
        else:
            hists[name] = ev.class_value_histograms(s.images, None, None, profile.value_range,
                                                    profile.threshold_classes, bodies)
    w1 = {c: round(ev.wasserstein1_hist(hists["version"][c], hists["reference"][c]), 3)
          for c in hists["version"] if c in hists["reference"]}
    nyq = 0.5 / max(max(version.spacings), max(reference.spacings))
    freqs = np.arange(0, nyq + 1e-9, nyq / 24)
    nps = {}
    uniform = {name: _masks_for_realism(s, profile, by_label)[1]
               for name, s in (("version", version), ("reference", reference))}
    for roi_mm in (16.0, 8.0):  # 8 mm squares where a set has no uniform region of 16 mm (e.g. a small field of view)
        for name, s in (("version", version), ("reference", reference)):
            nps[name] = ev.noise_power_spectrum(s.images, uniform[name], s.spacings, freqs, roi_mm=roi_mm)
        if nps["version"]["rois"] and nps["reference"]["rois"]:
            break
    rep: dict[str, Any] = {
        "classes_by": "labels" if by_label else "intensity intervals inside the body (the reference has no labels)",
        "wasserstein1": w1, "units": profile.units,
        "nps": {"distance_decades": ev.nps_distance(nps["version"], nps["reference"]),
                "noise_std_version": nps["version"]["noise_std"], "noise_std_reference": nps["reference"]["noise_std"],
                "rois_version": nps["version"]["rois"], "rois_reference": nps["reference"]["rois"],
                "roi_mm": roi_mm},
    }
    if features is not None:
        fv, fr, source = features[:3]
        # Comparable: an extractor given on disk, identified by its weights' sha256 (FID/KID computed with the same
        # file elsewhere can be set beside these); a segmenter trained here gives numbers for this run only.
        extractor = features[3] if len(features) > 3 else None
        label = {"comparable": extractor is not None,
                 "comparability": (f"comparable with FID/KID computed with the same extractor (weights sha256 "
                                   f"{extractor['sha256'][:16]}…)" if extractor is not None else
                                   "NOT comparable: features of a segmenter trained in this run, not of a published "
                                   "extractor"),
                 **({"extractor": extractor} if extractor is not None else {})}
        if len(fv) >= 2 and len(fr) >= 2:
            kid, kid_sd = ev.kernel_distance(fv, fr, subsets=20, subset_size=min(100, len(fv), len(fr)))
            rep["features"] = {"fid": round(ev.frechet_distance(fv, fr), 4), "kid": round(kid, 6),
                               "kid_std": round(kid_sd, 6), "source": source, "n": [len(fv), len(fr)], **label,
                               "dims": int(fv.shape[1])}
        else:
            rep["features"] = {"fid": None, "kid": None, "source": source, **label,
                               "why": f"needs at least 2 images per set (have {len(fv)} and {len(fr)})"}
    curves = {"hists": hists, "nps": nps, "value_range": profile.value_range}
    return rep, curves


def memorisation(version: ImageSet, train: ImageSet, heldout: ImageSet, profile: ev.EvalProfile, seg=None
                 ) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    """Nearest neighbours of each generated image in the generator's training set vs a held-out real set, in
    pixel space and (with a segmenter) feature space; near-copies flagged, with the pairs shown."""
    win = profile.display_window
    spaces = {"pixel": (ev.pixel_vectors(version.images, win), ev.pixel_vectors(train.images, win),
                        ev.pixel_vectors(heldout.images, win))}
    if seg is not None:
        def feats(s: ImageSet) -> np.ndarray:
            f = np.stack([seg.features(im, sp) for im, sp in zip(s.images, s.spacings)])
            return f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-9) * math.sqrt(f.shape[1])
        spaces["feature"] = (feats(version), feats(train), feats(heldout))
    rep: dict[str, Any] = {"train": train.name, "heldout": heldout.name}
    flagged_union: set[int] = set()
    for name, (g, t, h) in spaces.items():
        r = ev.memorisation_report(g, t, h)
        flagged_union |= set(r["flagged"]) if name == "pixel" else set()
        rep[name] = {"copy_threshold": r["copy_threshold"], "heldout_to_train_p05": r["heldout_to_train_p05"],
                     "median_d_train": float(np.median(r["d_train"])), "median_d_heldout": float(np.median(r["d_heldout"])),
                     "share_closer_to_train": float(np.mean(r["d_train"] < r["d_heldout"])),
                     "flagged": [{"sample": version.ids[i], "train_match": train.ids[int(r["j_train"][i])],
                                  "d_train": float(r["d_train"][i]), "d_heldout": float(r["d_heldout"][i])}
                                 for i in r["flagged"]]}
        if name == "pixel":
            pix = r
    rep["flagged"] = len(flagged_union)
    rep["passed"] = not flagged_union
    pairs = []
    import cv2

    c, w = win
    to8 = lambda a: np.clip((a - (c - w / 2)) / w * 255, 0, 255).astype(np.uint8)  # noqa: E731
    for i in sorted(flagged_union)[:8]:
        j = int(pix["j_train"][i])
        a, b = to8(version.images[i]), to8(train.images[j])
        if a.shape != b.shape:
            b = cv2.resize(b, a.shape[::-1])
        pairs.append((f"copy_{version.ids[i]}__{train.ids[j]}.png",
                      cv2.cvtColor(np.hstack([a, np.full((a.shape[0], 4), 255, np.uint8), b]), cv2.COLOR_GRAY2RGB)))
    return rep, pairs


def load_feature_extractor(path: str, device: str = "cpu"):
    """A feature extractor given on disk: ``path`` (safetensors weights) and ``path + '.json'`` naming a network of
    ``monai.networks.nets`` with its arguments, the module whose output is pooled, the input size and window.
    Nothing is downloaded; pickled checkpoints (.pt/.pth/.ckpt/.bin) are refused (loading one runs code), and so
    are weights that do not fit the named network, each in one line. Returns fn(image, spacing) -> feature vector,
    with ``fn.info`` (network, module, size, window, dims, sha256 of the weights)."""
    import os

    import torch
    from safetensors.torch import load_file

    cfg_path = path + ".json"
    if not os.path.exists(path) or not os.path.exists(cfg_path):
        raise SpecError(f"--features {path!r}: needs the safetensors file and {os.path.basename(cfg_path)} beside it "
                        '({"network": "<monai.networks.nets name>", "kwargs": {...}, "module": "<submodule>", '
                        '"size": <px>, "window": [centre, width]})')
    raw = open(path, "rb").read()
    if not _is_safetensors(raw):
        kind = ("a PyTorch zip checkpoint" if raw[:2] == b"PK" else "a pickle" if raw[:1] == b"\x80"
                else "not safetensors")
        raise SpecError(f"--features {path!r} is {kind}; accepted: safetensors weights only (pickles are refused: "
                        "loading one can run code); convert with safetensors.torch.save_file(model.state_dict(), ...)")
    try:
        cfg = json.loads(open(cfg_path).read())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise SpecError(f"--features: {cfg_path} is not a JSON object ({e})") from None
    import monai.networks.nets as nets

    if not hasattr(nets, str(cfg.get("network", ""))):
        raise SpecError(f"--features: unknown network {cfg.get('network')!r}; accepted: a class of "
                        "monai.networks.nets")
    try:
        net = getattr(nets, cfg["network"])(**cfg.get("kwargs", {}))
    except Exception as e:
        raise SpecError(f"--features: {cfg['network']}(**kwargs) from {os.path.basename(cfg_path)} failed: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    weights = load_file(path)
    own = net.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = sorted(k for k in set(own) & set(weights) if tuple(own[k].shape) != tuple(weights[k].shape))
    if missing or unexpected or shapes:
        parts = [f"{len(x)} {what} (e.g. {x[0]})" for x, what in ((missing, "missing"), (unexpected, "unexpected"),
                                                                 (shapes, "of another shape")) if x]
        raise SpecError(f"--features {path!r} does not fit {cfg['network']} with the kwargs of "
                        f"{os.path.basename(cfg_path)}: tensors {', '.join(parts)}; accepted: the state_dict of that "
                        "network")
    net.load_state_dict(weights)
    net.eval().to(device)
    try:
        module = net.get_submodule(cfg["module"]) if cfg.get("module") else net
    except AttributeError:
        raise SpecError(f"--features: {cfg['network']} has no module {cfg['module']!r}") from None
    size = int(cfg.get("size", 224))
    c, w = cfg.get("window", [-600, 1500])
    n_in = int(cfg.get("in_channels", cfg.get("kwargs", {}).get("in_channels", 1)))

    def fn(image: np.ndarray, sp: float) -> np.ndarray:
        import cv2

        x = np.clip((image - (c - w / 2)) / w, 0, 1).astype(np.float32)
        x = cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA)
        t = torch.from_numpy(np.repeat(x[None, None], n_in, 1)).to(device)
        out: list = []
        h = module.register_forward_hook(lambda m, i, o: out.append(o))
        with torch.no_grad():
            net(t)
        h.remove()
        o = out[-1]
        return (o.flatten(2).mean(2) if o.ndim > 2 else o)[0].cpu().numpy().astype(np.float64)

    import hashlib

    probe = fn(np.zeros((size, size), np.float32), 1.0)
    fn.info = {"network": cfg["network"], "module": cfg.get("module") or "", "size": size, "window": [c, w],
               "dims": int(probe.shape[0]), "sha256": hashlib.sha256(raw).hexdigest(), "file": os.path.abspath(path)}
    return fn


def _is_safetensors(raw: bytes) -> bool:
    """The safetensors layout: an 8-byte little-endian header length, then that many bytes of a JSON object."""
    if len(raw) < 10:
        return False
    n = int.from_bytes(raw[:8], "little")
    if not 2 <= n <= len(raw) - 8:
        return False
    try:
        return isinstance(json.loads(raw[8:8 + n]), dict)
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------- Prefect tasks
_T = dict(persist_result=False, cache_policy=None)


@task(name="load-version", **_T)
def load_version_task(ref: str, root: str | None, limit: int | None) -> ImageSet:
    return load_version(ref, root, limit)


@task(name="load-reference", **_T)
def load_reference_task(real: str, domain: str, size: int, root: str | None, limit: int | None) -> ImageSet:
    return load_reference(real, domain, size, root, limit)


@task(name="label-fidelity", **_T)
def label_fidelity_task(version: ImageSet, profile: ev.EvalProfile, opts: EvalOptions) -> dict:
    return label_fidelity(version, profile, opts)


@task(name="train-segmenter", **_T)
def train_segmenter_task(data: LabelledSet, profile: ev.EvalProfile, cfg: SegmenterConfig):
    return train_on(data, profile, cfg)


@task(name="score", **_T)
def score_task(seg, data: LabelledSet, profile: ev.EvalProfile) -> dict:
    return score(seg, data, profile)


@task(name="learned-check", **_T)
def learned_check_task(seg, version: ImageSet, profile, ref_score, opts):
    return learned_check(seg, version, profile, ref_score, opts)


@task(name="features", **_T)
def features_task(fn, s: ImageSet) -> np.ndarray:
    return np.stack([fn(im, sp) for im, sp in zip(s.images, s.spacings)])


@task(name="realism", **_T)
def realism_task(version, reference, profile, features):
    return realism(version, reference, profile, features)


@task(name="utility", **_T)
def utility_task(real_train, real_test, synthetic, profile, cfg, opts: EvalOptions) -> dict:
    return utility_study(real_train, real_test, synthetic, profile, cfg, opts.ks, opts.seeds, opts.n_synthetic)


@task(name="memorisation", **_T)
def memorisation_task(version, train, heldout, profile, seg):
    return memorisation(version, train, heldout, profile, seg)


@task(name="write-evaluation", **_T)
def write_task(root: str | None, version: ImageSet, report: dict, images: dict[str, np.ndarray],
               curves: dict | None) -> str:
    return write_evaluation(root, version, report, images, curves)


# ------------------------------------------------------------------------------------------- the flow
def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    return f"evaluate {flow_run.parameters.get('ref', '')}"


def _direct(t, *args):
    """Run a task's body in this process without Prefect (library use, tests)."""
    return t.fn(*args)


def _prefect(t, *args):
    return t(*args)


def evaluate_one(ref: str, reference: ImageSet | None, seg, ref_score: dict | None, profile_domain: str | None,
                 root: str | None, opts: EvalOptions, extractor=None, version: ImageSet | None = None,
                 call=_direct) -> dict[str, Any]:
    """Every check of one version against an already loaded reference. ``seg``: the segmenter trained on the
    reference (learned check, features); ``ref_score`` its Dice on the reference's test part (None when the
    reference has no labels and ``seg`` learned from the version itself: then it serves for features only)."""
    t0 = time.perf_counter()
    version = version or call(load_version_task, ref, root, opts.limit)
    profile = ev.profile_for(version.domain)
    if profile_domain and profile_domain != version.domain:
        raise SpecError(f"{ref} is a {version.domain} dataset but the reference is {profile_domain}")
    report: dict[str, Any] = {"format": "pairforge.evaluation/1", "version": version.name,
                              "samples_evaluated": len(version),
                              "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                              "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
                              "device": resolve_device(opts.device)}
    images: dict[str, np.ndarray] = {}
    report["label_fidelity"] = call(label_fidelity_task, version, profile, opts)
    curves = None
    if reference is not None:
        report["reference"] = {"name": reference.name, "kind": reference.kind, "samples": len(reference),
                               "labelled": reference.labelled, "note": reference.note}
    if seg is not None and ref_score is not None:
        lc, overlays = call(learned_check_task, seg, version, profile, ref_score, opts)
        report["learned_check"] = lc
        images.update(dict(overlays))
    if reference is not None:
        feats = None
        if extractor is not None:
            feats = (call(features_task, extractor, version), call(features_task, extractor, reference),
                     f"feature extractor {opts.features} ({extractor.info['network']}, {extractor.info['dims']} "
                     "features)", extractor.info)
        elif seg is not None:
            fn = seg.features
            whose = "the reference segmenter's" if ref_score is not None else "a segmenter trained on the version's"
            feats = (call(features_task, fn, version), call(features_task, fn, reference),
                     f"{whose} encoder (NOT comparable with published FID/KID values)")
        report["realism"], curves = call(realism_task, version, reference, profile, feats)
        if opts.utility and reference.labelled and len(reference) >= 4:
            tr, te = reference.split_indices()
            report["utility"] = call(utility_task, reference.labelled_set(tr), reference.labelled_set(te),
                                             version.labelled_set(), profile, opts.segmenter(), opts)
    if opts.train_ref:
        train = call(load_reference_task, opts.train_ref, version.domain, version.images[0].shape[0], root, opts.limit)
        if reference is None:
            report["memorisation"] = {"skipped": "memorisation needs a held-out reference (--real)"}
        else:
            _, te = reference.split_indices()
            held = ImageSet(reference.name + " (test part)", reference.kind, reference.domain,
                            [reference.images[i] for i in te], [reference.spacings[i] for i in te],
                            [reference.ids[i] for i in te])
            report["memorisation"], pairs = call(memorisation_task, version, train, held, profile, seg)
            images.update(dict(pairs))
    else:
        report["memorisation"] = {"skipped": "no training set given (--train-ref): only generators trained on data "
                                             "can copy it"}
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["folder"] = call(write_task, root, version, report, images, curves)
    return report


def evaluate_versions(ref: str, real: str | None = None, against: str | None = None, root: str | None = None,
                      options: dict[str, Any] | EvalOptions | None = None, call=_direct) -> dict[str, Any]:
    """Evaluate ``ref`` (and ``against``, with the same reference and segmenter) and write the reports. ``call``
    runs each step: in this process (the default) or as a Prefect task (inside the flow)."""
    opts = options_from(options)
    # The extractor first: a refused file stops the evaluation before anything is computed.
    extractor = load_feature_extractor(opts.features, resolve_device(opts.device)) if opts.features else None
    version = call(load_version_task, ref, root, opts.limit)
    profile = ev.profile_for(version.domain)
    reference = seg = ref_score = None
    if real:
        reference = call(load_reference_task, real, version.domain, version.images[0].shape[0], root, opts.limit)
    if reference is not None and reference.labelled:
        tr, te = reference.split_indices()
        seg = call(train_segmenter_task, reference.labelled_set(tr), profile, opts.segmenter())
        ref_score = call(score_task, seg, reference.labelled_set(te), profile)
    elif reference is not None:
        # An unlabelled reference: the segmenter learns from the version itself (for features only).
        seg = call(train_segmenter_task, version.labelled_set(), profile, opts.segmenter())
    reports = {"evaluated": evaluate_one(ref, reference, seg, ref_score, version.domain, root, opts, extractor,
                                         version, call=call)}
    if against:
        reports["against"] = evaluate_one(against, reference, seg, ref_score, version.domain, root, opts, extractor,
                                          call=call)
    return reports


@flow(name="evaluate-dataset", flow_run_name=_flow_run_name, validate_parameters=False, log_prints=False)
def evaluate_dataset(ref: str, real: str | None = None, against: str | None = None, root: str | None = None,
                     options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The evaluation as a Prefect flow: every step a task run (see ``evaluate_versions``)."""
    return evaluate_versions(ref, real, against, root, options, call=_prefect)


def options_from(options: dict[str, Any] | EvalOptions | None) -> EvalOptions:
    if isinstance(options, EvalOptions):
        return options
    opts = EvalOptions()
    known = set(asdict(opts))
    unknown = sorted(set(options or {}) - known)
    if unknown:
        raise SpecError(f"unknown evaluation option(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}")
    opts = replace(opts, **(options or {}))
    for k in ("ks", "seeds", "channels"):
        setattr(opts, k, tuple(int(x) for x in getattr(opts, k)))
    if opts.steps < 1 or opts.patch < 16 or opts.batch < 1:
        raise SpecError("evaluation options: steps >= 1, patch >= 16 and batch >= 1 are required")
    return opts


def run_evaluate(ref: str, real: str | None = None, against: str | None = None, root: str | None = None,
                 options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check the inputs (one readable line on bad input, before anything runs), then run the flow."""
    from store import DatasetStore

    st = DatasetStore(root)
    st.resolve(ref)
    if against:
        st.resolve(against)
    options_from(options)
    return evaluate_dataset(ref, real=real, against=against, root=root, options=options)


# ------------------------------------------------------------------------------------------- output
def _png(rgb: np.ndarray) -> bytes:
    import cv2

    arr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    return bytes(buf)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def evaluation_dir(root_obj, name: str, version: int, stamp: str) -> str:
    return root_obj.join(EVAL_DIR, name, f"v{version}", stamp)


def write_evaluation(root: str | None, version: ImageSet, report: dict, images: dict[str, np.ndarray],
                     curves: dict | None) -> str:
    """evaluation.json, README.md (the card section) and its plots into a new folder of the evaluation's own."""
    from store.root import parse_ref, resolve_root

    r = resolve_root(root)
    name, v = parse_ref(version.name)
    body = json.dumps(_jsonable(report), indent=1, sort_keys=False).encode()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + hashlib.sha256(body).hexdigest()[:8]
    base = evaluation_dir(r, name, v, stamp)
    files: dict[str, bytes] = {f"{base}/{k}": _png(a) for k, a in images.items()}
    plots = render_plots(report, curves)
    files.update({f"{base}/{k}": b for k, b in plots.items()})
    files[f"{base}/README.md"] = card_section(report, sorted(plots), sorted(images)).encode()
    r.write_many(files)
    r.write_bytes(f"{base}/evaluation.json", body)  # last: a folder with evaluation.json is complete
    return r.uri(EVAL_DIR, name, f"v{v}", stamp)


def latest_evaluation(root: str | None, ref: str) -> dict[str, Any] | None:
    """The newest complete evaluation of a version, or None."""
    from store import DatasetStore
    from store.root import resolve_root

    r = resolve_root(root)
    name, v = DatasetStore(root).resolve(ref)
    d = r.join(EVAL_DIR, name, f"v{v}")
    if not r.exists(d):
        return None
    for stamp in sorted(r.listdir_names(d), reverse=True):
        p = f"{d}/{stamp}/evaluation.json"
        if r.exists(p):
            return json.loads(r.read_bytes(p))
    return None


def render_plots(report: dict, curves: dict | None) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        out[name] = buf.getvalue()

    if curves:
        hv, hr = curves["hists"]["version"], curves["hists"]["reference"]
        lo, hi = curves["value_range"]
        classes = [c for c in hv if c in hr]
        if classes:
            fig, axs = plt.subplots(1, len(classes), figsize=(3.2 * len(classes), 2.6))
            axs = np.atleast_1d(axs)
            x = np.arange(lo, hi + 1)
            for ax, c in zip(axs, classes):
                for h, lab in ((hv[c], "version"), (hr[c], "reference")):
                    k = 8
                    hs = np.convolve(h / max(h.sum(), 1), np.ones(k) / k, mode="same")
                    nz = np.nonzero(h)[0]
                    sl = slice(max(0, nz.min() - 20), min(len(h), nz.max() + 20)) if len(nz) else slice(None)
                    ax.plot(x[sl], hs[sl], label=lab)
                ax.set_title(f"{c}: W1 {report['realism']['wasserstein1'].get(c, float('nan')):.1f}", fontsize=9)
                ax.tick_params(labelsize=7)
            axs[0].legend(fontsize=7)
            fig.tight_layout()
            save(fig, "realism_histograms.png")
        fig, ax = plt.subplots(figsize=(4, 3))
        for k, lab in (("version", "version"), ("reference", "reference")):
            n = curves["nps"][k]
            ax.semilogy(n["freqs"][1:], n["nps"][1:], label=lab)
        ax.set_xlabel("cycles/mm")
        ax.set_ylabel("NPS (units² mm²)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        save(fig, "realism_nps.png")
    lc = report.get("learned_check")
    if lc:
        names = list(lc["dice_per_class"])
        fig, ax = plt.subplots(figsize=(4.5, 2.8))
        xs = np.arange(len(names))
        ax.bar(xs - 0.2, [lc["dice_per_class"][n] or 0 for n in names], 0.4, label="version")
        if lc.get("reference_test"):
            ax.bar(xs + 0.2, [lc["reference_test"]["dice_per_class"][n] or 0 for n in names], 0.4,
                   label="reference test")
        ax.set_xticks(xs, names, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("Dice")
        ax.legend(fontsize=7)
        fig.tight_layout()
        save(fig, "learned_check_dice.png")
    ut = report.get("utility")
    if ut:
        out.update(utility_plot(ut, save_fn=None))
    return out


def utility_plot(ut: dict, save_fn=None, metric: str | None = None) -> dict[str, bytes]:
    """Learning curve over k: finding Dice (mean and CI over seeds) for real alone vs real + synthetic, with the
    synthetic-only (TSTR) level as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ut["summary"]
    metric = metric or next(k for k in rows[0] if k.startswith("finding_dice_ge_"))
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for arm, col in (("real", "tab:blue"), ("real+synthetic", "tab:orange")):
        rs = sorted([r for r in rows if r["arm"] == arm], key=lambda r: r["k"])
        if not rs:
            continue
        k = [r["k"] for r in rs]
        m = [r[metric]["mean"] for r in rs]
        lo = [r[metric]["lo"] for r in rs]
        hi = [r[metric]["hi"] for r in rs]
        ax.plot(k, m, "o-", color=col, label=arm)
        ax.fill_between(k, lo, hi, color=col, alpha=0.2)
    ts = [r for r in rows if r["arm"] == "synthetic"]
    if ts:
        ax.axhline(ts[0][metric]["mean"], color="tab:green", ls="--", label="synthetic only (TSTR)")
    ax.set_xscale("log")
    ax.set_xlabel("k real training images")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return {"utility_curve.png": buf.getvalue()}


def _f(x, nd=3):
    return "–" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def card_section(report: dict, plots: list[str], images: list[str]) -> str:
    lf = report["label_fidelity"]
    lines = [f"## Evaluation of {report['version']}", "",
             f"{report['created_at']} · {report['samples_evaluated']} samples · device {report['device']} · "
             f"{report['seconds']} s", ""]
    ref = report.get("reference")
    if ref:
        lines += [f"Reference: `{ref['name']}` ({ref['kind']}, {ref['samples']} images, "
                  f"{'labelled' if ref['labelled'] else 'unlabelled'}). {ref['note']}", ""]
    lines += ["### Label fidelity", "",
              f"**{'PASSED' if lf['passed'] else 'FAILED'}** — {lf['failing']} of {lf['findings']} findings fail "
              f"({lf['failing_share']:.1%}); criteria: {lf['criteria']}. Finding contrast-to-noise median "
              f"{_f(lf['cnr']['median'], 1)}, 5th percentile {_f(lf['cnr']['p05'], 1)}.", "",
              "| tissue | median | p05 | p95 | reference range | share in range | ok |", "|---|---|---|---|---|---|---|"]
    for t in lf["tissue"]:
        lines.append(f"| {t['class']} | {t['median']:.0f} | {t['p05']:.0f} | {t['p95']:.0f} | "
                     f"{t['range'][0]:g} to {t['range'][1]:g} | {t['share_in_range']:.2f} | {'yes' if t['passed'] else 'NO'} |")
    for f in lf["failing_findings"][:10]:
        lines.append(f"- failing: sample {f['sample']} finding {f['instance']} ({f['equivalent_diameter_mm']:.1f} mm): {f['reason']}")
    lc = report.get("learned_check")
    if lc:
        lines += ["", "### Learned check (segmenter trained on the reference, applied to this version)", "",
                  "| class | Dice on this version | Dice on the reference test set |", "|---|---|---|"]
        rt = (lc.get("reference_test") or {}).get("dice_per_class", {})
        for c, d in lc["dice_per_class"].items():
            lines.append(f"| {c} | {_f(d)} | {_f(rt.get(c))} |")
        k = next((k for k in lc if k.startswith("finding_dice_ge_")), None)
        if k:
            lines.append(f"| findings ≥ 6 mm (per finding) | {_f(lc[k])} | {_f((lc.get('reference_test') or {}).get(k))} |")
        lines += ["", "Worst samples (left: label outlines green, findings yellow; right: prediction red, findings magenta): "
                  + ", ".join(f"[{n}]({n})" for n in images if n.startswith("worst_"))]
    rl = report.get("realism")
    if rl:
        lines += ["", "### Realism", "", f"Classes by {rl['classes_by']}.", "",
                  "| class | Wasserstein-1 (" + rl["units"] + ") |", "|---|---|"]
        lines += [f"| {c} | {w:.1f} |" for c, w in rl["wasserstein1"].items()]
        n = rl["nps"]
        lines += ["", f"Noise power spectrum in uniform tissue: mean |log10 ratio| {_f(n['distance_decades'])} decades; "
                  f"noise std {_f(n['noise_std_version'], 1)} vs {_f(n['noise_std_reference'], 1)} {rl['units']}."]
        if rl.get("features"):
            f = rl["features"]
            lines.append(f"FID {_f(f.get('fid'), 2)}, KID {_f(f.get('kid'), 4)} — features of {f['source']}; "
                         f"{f.get('comparability', '')}.")
    ut = report.get("utility")
    if ut:
        lines += ["", "### Utility (segmenter tested on held-out reference images)", "",
                  f"{ut['n_real_train']} reference images for training draws, {ut['n_real_test']} held out; "
                  f"seeds {ut['seeds']}; N synthetic = {ut['n_synthetic']}.", ""]
        lines += utility_table(ut)
    mm = report.get("memorisation", {})
    lines += ["", "### Memorisation", ""]
    if "skipped" in mm:
        lines.append(f"Not run: {mm['skipped']}.")
    else:
        lines.append(f"**{'PASSED' if mm['passed'] else 'FLAGGED'}** — {mm['flagged']} near-copies of training images "
                     f"(training set {mm['train']}, held-out {mm['heldout']}).")
        for sp in ("pixel", "feature"):
            if sp in mm:
                lines.append(f"- {sp} space: copy threshold {mm[sp]['copy_threshold']:.4f}; median distance to train "
                             f"{mm[sp]['median_d_train']:.4f} vs held-out {mm[sp]['median_d_heldout']:.4f}; "
                             f"flagged {len(mm[sp]['flagged'])}")
        lines += [f"- [{n}]({n})" for n in images if n.startswith("copy_")]
    if plots:
        lines += ["", "### Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def utility_table(ut: dict) -> list[str]:
    rows = ut["summary"]
    metric = next(k for k in rows[0] if k.startswith("finding_dice_ge_"))
    classes = [k for k in rows[0] if k not in ("arm", "k", "n_synthetic", "seeds", metric)]

    def ci(d):
        if d["n"] == 0 or d["mean"] != d["mean"]:
            return "–"
        return f"{d['mean']:.3f}" + ("" if d["lo"] != d["lo"] else f" [{d['lo']:.3f}, {d['hi']:.3f}]")

    out = [f"| arm | k real | N synthetic | {metric.replace('_', ' ')} (95% CI) | " + " | ".join(classes) + " |",
           "|---|---|---|---|" + "---|" * len(classes)]
    for r in rows:
        out.append(f"| {r['arm']} | {r['k']} | {r['n_synthetic']} | {ci(r[metric])} | "
                   + " | ".join(f"{r[c]['mean']:.3f}" if r[c]["n"] else "–" for c in classes) + " |")
    return out


def side_by_side(a: dict, b: dict) -> list[tuple[str, str, str]]:
    """Rows (metric, value for a, value for b) of two evaluation reports."""
    def get(r, *path):
        for p in path:
            if not isinstance(r, dict) or p not in r:
                return None
            r = r[p]
        return r

    rows = [("label fidelity", "passed" if get(a, "label_fidelity", "passed") else "FAILED",
             "passed" if get(b, "label_fidelity", "passed") else "FAILED"),
            ("failing findings", _f(get(a, "label_fidelity", "failing_share")), _f(get(b, "label_fidelity", "failing_share"))),
            ("median finding CNR", _f(get(a, "label_fidelity", "cnr", "median"), 1),
             _f(get(b, "label_fidelity", "cnr", "median"), 1))]
    for c in (get(a, "learned_check", "dice_per_class") or {}):
        rows.append((f"learned Dice {c}", _f(get(a, "learned_check", "dice_per_class", c)),
                     _f(get(b, "learned_check", "dice_per_class", c))))
    for c in (get(a, "realism", "wasserstein1") or {}):
        rows.append((f"W1 {c}", _f(get(a, "realism", "wasserstein1", c), 1), _f(get(b, "realism", "wasserstein1", c), 1)))
    rows.append(("NPS distance (decades)", _f(get(a, "realism", "nps", "distance_decades")),
                 _f(get(b, "realism", "nps", "distance_decades"))))
    rows.append(("FID (see source)", _f(get(a, "realism", "features", "fid"), 2), _f(get(b, "realism", "features", "fid"), 2)))
    for arm in ("synthetic", "real+synthetic"):
        for ra, rb in zip([r for r in get(a, "utility", "summary") or [] if r["arm"] == arm],
                          [r for r in get(b, "utility", "summary") or [] if r["arm"] == arm]):
            m = next(k for k in ra if k.startswith("finding_dice_ge_"))
            rows.append((f"utility {arm} k={ra['k']} {m.replace('_', ' ')}", _f(ra[m]["mean"]), _f(rb[m]["mean"])))
    rows.append(("memorisation flagged", _f(get(a, "memorisation", "flagged")), _f(get(b, "memorisation", "flagged"))))
    return rows


__all__ = ["EvalOptions", "evaluate_dataset", "evaluate_versions", "run_evaluate", "label_fidelity", "learned_check", "realism",
           "memorisation", "latest_evaluation", "side_by_side", "options_from", "utility_table", "utility_plot"]
