"""Per-sample glue: plan -> layout -> render -> annotate/QC, with bounded, recorded regeneration.

Pure library code (no Prefect): the flows call it per shard; `pairforge preview` calls it directly.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from annotators import annotate, instance_boxes
from generators import Backend, get_backend
from schemas.errors import GenerationError, PlacementError, SpecError
from schemas.plan import plan_sample
from schemas.sample import Layout, Sample, SampleRequest
from schemas.seeding import STREAM_GENERATE, sample_rng
from schemas.spec import BaseSpec, spec_hash


def backend_for(spec: BaseSpec) -> Backend:
    """The spec's backend, with everything it can check about the spec checked before any generation."""
    backend = get_backend(spec.generator.name, spec.domain, spec.generator.options)
    backend.renderer.check_spec(spec)
    return backend


def _finish(spec: BaseSpec, request: SampleRequest, layout: Layout, image: np.ndarray, render_params: dict,
            digest: str, attempt: int, history: list[dict], backend: Backend) -> tuple[Sample, bool]:
    ann = annotate(spec.domain, image, layout, request, spec.qc)
    history.append({"attempt": attempt, "passed": ann.passed,
                    "failed_checks": [c["name"] for c in ann.checks if not c["passed"]]})
    sample = Sample(
        sample_id=request.sample_id, index=request.index, split=request.split, domain=spec.domain,
        spacing_mm=layout.spacing_mm, image=image, label=layout.label, instance=layout.instance,
        requested=layout.findings, measured=ann.measured,
        params={"request": request.params, "layout": layout.params, "render": render_params},
        qc={"passed": ann.passed, "attempts": attempt + 1, "checks": ann.checks, "history": list(history)},
        seed={"spec_hash": digest, "index": request.index, "attempt": attempt, "seed": spec.seed},
        generator={"name": backend.name, "version": backend.version},
        bboxes=ann.bboxes if (ann.bboxes or not layout.findings) else instance_boxes(layout.instance),
        group=request.params.get("group"),
    )
    return sample, ann.passed


def make_samples(spec: BaseSpec, indices: list[int] | range, *, digest: str | None = None,
                 backend: Backend | None = None) -> list[Sample]:
    """Generate the samples at ``indices``. First attempts are rendered as one batch (GPU backends batch them);
    a sample that fails placement or QC is regenerated alone from a derived seed, up to ``qc.max_attempts``."""
    digest = digest or spec_hash(spec)
    backend = backend or backend_for(spec)
    max_attempts = spec.qc.max_attempts
    requests = [plan_sample(spec, i, digest) for i in indices]
    history: dict[int, list[dict]] = {r.index: [] for r in requests}

    def try_layout(req: SampleRequest, attempt: int):
        rng = sample_rng(digest, req.index, STREAM_GENERATE, attempt)
        try:
            return backend.layout(spec, req, rng), rng
        except PlacementError as e:
            history[req.index].append({"attempt": attempt, "passed": False, "failed_checks": ["placement"],
                                       "detail": str(e)})
            return None, rng

    # First attempt for every sample, rendered in one batch.
    first = [try_layout(r, 0) for r in requests]
    ok = [(r, lay, rng) for r, (lay, rng) in zip(requests, first) if lay is not None]
    rendered = backend.renderer.render_batch([lay for _, lay, _ in ok], [rng for _, _, rng in ok])
    done: dict[int, tuple[Sample, bool]] = {}
    for (req, lay, _), (img, rparams) in zip(ok, rendered):
        done[req.index] = _finish(spec, req, lay, img, rparams, digest, 0, history[req.index], backend)

    out = []
    for req in requests:
        attempt = 1
        best = done.get(req.index)
        while (best is None or not best[1]) and attempt < max_attempts:
            lay, rng = try_layout(req, attempt)
            if lay is not None:
                img, rparams = backend.render(lay, rng)
                best = _finish(spec, req, lay, img, rparams, digest, attempt, history[req.index], backend)
            attempt += 1
        if best is None:
            last = history[req.index][-1].get("detail", "") if history[req.index] else ""
            raise GenerationError(f"sample {req.sample_id}: no valid layout in {max_attempts} attempts ({last})")
        out.append(best[0])
    return out


def make_sample(spec: BaseSpec, index: int, **kw) -> Sample:
    return make_samples(spec, [index], **kw)[0]


__all__ = ["PlacementError", "GenerationError", "make_sample", "make_samples", "backend_for", "SpecError"]
