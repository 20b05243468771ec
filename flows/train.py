"""The training flow: training spec -> prepared pairs -> training with checkpoints (validation grid each) -> model
folder. A recipe of calls into ``flows.train_data`` (pairs) and ``generators.learned_train`` /
``generators.learned_finetune`` (the two routes); rerunning it after an interruption reuses the prepared pairs and
resumes from the last complete checkpoint. Progress (steps/s, loss, ETA) goes to Prefect's logs and to a reporter the CLI
sets (its rich progress bar).
"""
from __future__ import annotations

from flows import settings  # noqa: F401  (Prefect defaults before prefect is imported)

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.inputs import code_version
from flows.progress import EventChannel
from schemas.errors import SpecError
from schemas.training import TrainSpec, load_train_spec, validate_train_spec

_events = EventChannel("pairforge_train_progress")
reporting_to = _events.reporting_to  # send training events (start, step, checkpoint) to fn while the flow runs here
LOG_EVERY_S = 10.0


def resolve_train_spec(spec: Any) -> tuple[TrainSpec, str]:
    if isinstance(spec, TrainSpec):
        return spec, spec.model_dump_json(indent=1)
    if isinstance(spec, dict):
        import yaml

        return validate_train_spec(spec), yaml.safe_dump(spec, sort_keys=False)
    if isinstance(spec, (str, Path)):
        return load_train_spec(spec)
    raise SpecError(f"a training spec must be a file path or a mapping, not {type(spec).__name__}")


def check_inputs(spec: TrainSpec) -> None:
    """Everything checkable before any reading or training: the domain's class table, the route's base model."""
    from generators.learned_data import domain_table

    domain_table(spec.domain)
    if spec.route == "controlnet":
        from generators.learned_finetune import check_finetune

        check_finetune(spec)


@task(name="prepare-pairs", task_run_name="prepare pairs")
def prepare_pairs(spec: TrainSpec, workdir: str) -> dict[str, Any]:
    from flows.train_data import prepare

    meta = prepare(spec, Path(workdir) / "data")
    get_run_logger().info(f"{meta['pairs']} pairs ({len(meta['train_ids'])} train, {len(meta['held_out_ids'])} "
                          f"held out), data sha256 {meta['sha256'][:16]}{' (reused)' if meta.get('reused') else ''}")
    return {k: meta[k] for k in ("pairs", "sha256", "reused")} | {"held_out": len(meta["held_out_ids"])}


@task(name="train", task_run_name="train {spec.name}")
def train_steps(spec: TrainSpec, workdir: str) -> dict[str, Any]:
    logger = get_run_logger()
    outer = _events.get()
    last = [0.0]

    def report(ev: dict[str, Any]) -> None:
        if outer is not None:
            outer(ev)
        now = time.perf_counter()
        if ev["event"] == "step" and (now - last[0] >= LOG_EVERY_S or ev["step"] >= ev["steps"]):
            last[0] = now
            eta = f"{ev['eta_s']:.0f} s" if ev.get("eta_s") is not None else "?"
            logger.info(f"step {ev['step']}/{ev['steps']} loss {ev['loss']:.4f} "
                        f"{ev['images_per_s']:.1f} images/s ({ev['images_per_s'] * 1.0 / spec.train.batch_size:.2f} "
                        f"steps/s) ETA {eta}")
        elif ev["event"] == "checkpoint":
            logger.info(f"checkpoint step {ev['step']}: {ev['path']}; validation grid {ev['grid']}")
        elif ev["event"] == "start" and ev.get("resumed_from") is not None:
            logger.info(f"resuming from step {ev['resumed_from']}")

    if spec.route == "controlnet":
        from generators.learned_finetune import train_controlnet

        return train_controlnet(spec, workdir, progress=report, log=logger.info)
    from generators.learned_train import train

    return train(spec, workdir, progress=report, log=logger.info)


@task(name="export-model", task_run_name="export {spec.name}")
def export_model(spec: TrainSpec, workdir: str, out: str, summary: dict[str, Any], spec_text: str) -> str:
    if spec.route == "controlnet":
        from generators.learned_finetune import export_controlnet

        path = export_controlnet(spec, workdir, out, summary, spec_text, code_version())
    else:
        from generators.learned_train import export

        path = export(spec, workdir, out, summary, spec_text, code_version())
    get_run_logger().info(f"model written to {path}")
    return str(path)


@flow(name="train-model", flow_run_name="train {out}", validate_parameters=False, log_prints=False)
def train_model(spec: Any, out: str, workdir: str | None = None) -> dict[str, Any]:
    """Train the model ``spec`` describes and write its folder to ``out`` (working files in ``out``.work)."""
    model, text = resolve_train_spec(spec)
    check_inputs(model)
    work = workdir or str(Path(out).with_name(Path(out).name + ".work"))
    t0 = time.perf_counter()
    data = prepare_pairs(model, work)
    summary = train_steps(model, work)
    path = export_model(model, work, out, summary, text)
    return {"model": path, "workdir": work, "data": data, "seconds": time.perf_counter() - t0,
            **{k: summary.get(k) for k in ("step", "steps", "resumed_from", "final_loss", "steady_images_per_s",
                                          "device", "precision", "parameters")}}
