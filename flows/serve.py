"""Scheduled rebuilds: one Prefect deployment of ``build_dataset`` per spec, on the cron of its ``schedule:``.

``pairforge serve a.yaml b.yaml`` validates every spec first, then serves the deployments from this process
(``prefect.serve``). On a real Prefect server the same deployments can go to a work pool instead; see
docs/orchestration.md.
"""
from __future__ import annotations

from flows import settings  # noqa: F401  (Prefect defaults before prefect is imported)

import os
from pathlib import Path
from typing import Any

from schemas.errors import SpecError

# Served flow runs execute in fresh processes that import flows.build; they pick their task runner from these.
RUNNER_ENV = {"runner": "PAIRFORGE_RUNNER", "workers": "PAIRFORGE_WORKERS", "dask_address": "PAIRFORGE_DASK_ADDRESS"}


def deployments_for(spec_paths: list[str], root: str | None = None, runner: str = "local",
                    workers: int | None = None, dask_address: str | None = None) -> list[tuple[Any, str, str | None]]:
    """(RunnerDeployment, dataset name, cron) per spec. Every spec is validated before anything is served;
    two specs for the same dataset name are an error (their deployments would collide)."""
    from flows.build import build_dataset
    from flows.inputs import check_root_writable, resolve_spec
    from flows.pipeline import backend_for
    from flows.runners import make_task_runner

    if not spec_paths:
        raise SpecError("serve needs at least one spec file")
    make_task_runner(runner, workers, dask_address)  # validate the choice now, not at 02:00
    check_root_writable(root)
    for key, value in (("runner", runner), ("workers", workers), ("dask_address", dask_address)):
        if value is not None:
            os.environ[RUNNER_ENV[key]] = str(value)
    out, seen = [], {}
    for p in spec_paths:
        spec, _ = resolve_spec(Path(p))
        backend_for(spec)
        if spec.name in seen:
            raise SpecError(f"{p!r} and {seen[spec.name]!r} both define dataset {spec.name!r}; serve one spec per dataset")
        seen[spec.name] = p
        params = {"spec": str(Path(p).resolve()), "root": _absolute_root(root)}
        dep = build_dataset.to_deployment(
            name=spec.name, cron=spec.schedule, parameters=params,
            description=f"Rebuild {spec.name} from {Path(p).name}" + (f" on cron {spec.schedule!r}" if spec.schedule else
                                                                    " (no schedule: runs on demand)"),
            tags=["pairforge", spec.domain],
        )
        out.append((dep, spec.name, spec.schedule))
    return out


def _absolute_root(root: str | None) -> str | None:
    """Served runs may start in another working directory: pin a relative local root to an absolute path."""
    from store.config import choose_root

    root = choose_root(root).url  # the root a build started here would use (see store/config.py)
    if "://" in root:
        return root
    return str(Path(os.path.expanduser(root)).resolve())


def serve_deployments(deployments: list[Any]) -> None:
    """Serve until interrupted (blocks)."""
    from prefect import serve

    serve(*deployments, print_starting_message=False)
