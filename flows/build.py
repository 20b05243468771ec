"""The build flow: spec -> deterministic shard plan -> one Prefect task per shard -> publish + dataset card.

A recipe of calls into the library: ``flows.pipeline.make_samples`` generates a shard, the store's
``BuildStaging.write_shard`` commits it, ``BuildStaging.publish`` makes the version visible. The staging
area's per-shard commit markers are the source of truth for resuming; Prefect's task cache is keyed on the
same (dataset, spec hash, code version, staged version, store root, shard) and only ever saves work.
"""
from __future__ import annotations

from flows import settings  # noqa: F401  (Prefect defaults before prefect is imported)

import contextlib
import contextvars
import datetime as dt
import os
import threading
import time
from typing import Any, Callable, Iterator

from prefect import flow, task
from prefect.cache_policies import Inputs
from prefect.futures import as_completed
from prefect.tasks import exponential_backoff

from flows import interrupt
from flows.card import card
from flows.card import warm_up as card_warm_up
from flows.pipeline import make_samples
from schemas.errors import SpecError
from schemas.plan import plan_shards
from flows.inputs import check_root_writable, code_version, resolve_spec  # noqa: F401  (re-exported)
from schemas.spec import BaseSpec, spec_hash

# Errors worth another try: storage and network hiccups. Bad input (SpecError) and bugs are not retried.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, ConnectionError, TimeoutError)

ProgressFn = Callable[[dict[str, Any]], None]
_progress: contextvars.ContextVar[ProgressFn | None] = contextvars.ContextVar("pairforge_progress", default=None)


@contextlib.contextmanager
def reporting_to(fn: ProgressFn) -> Iterator[None]:
    """Send build events (``plan``, ``shard``, ``published``) to ``fn`` while the flow runs in this context."""
    token = _progress.set(fn)
    try:
        yield
    finally:
        _progress.reset(token)


def _emit(event: str, **data: Any) -> None:
    fn = _progress.get()
    if fn is not None:
        fn({"event": event, **data})


def _is_transient(task, task_run, state) -> bool:
    """Retry condition: only storage/network errors, never bad input (SpecError is a ValueError)."""
    try:
        state.result()
    except SpecError:
        return False
    except TRANSIENT_ERRORS:
        return True
    except BaseException:
        return False
    return False


def _shard_run_name() -> str:
    from prefect.runtime import task_run

    p = task_run.parameters
    return f"shard {p['shard'] + 1}/{p['n_shards']}"


@task(name="shard",
      task_run_name=_shard_run_name,
      retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
      retry_condition_fn=_is_transient,
      # Keyed on cache_scope (dataset, spec hash, code version, staged version, store root) + shard index.
      cache_policy=Inputs(exclude=["spec", "staging", "start", "stop", "n_shards"]),
      cache_expiration=dt.timedelta(days=7))
def build_shard(spec: BaseSpec, staging: Any, shard: int, start: int, stop: int, n_shards: int,
                cache_scope: str) -> dict[str, Any]:
    """Generate samples [start, stop) and commit them as shard ``shard``; reuse it if its marker exists."""
    if staging.has_shard(shard):
        return {"shard": shard, "n": stop - start, "reused": True, "seconds": 0.0}
    t0 = time.perf_counter()
    interrupt.hold("shard")
    samples = make_samples(spec, range(start, stop), digest=staging.digest, backend=_backend(spec, staging.digest))
    info = dict(staging.write_shard(shard, samples))
    info.update(shard=shard, n=len(samples), reused=False, seconds=time.perf_counter() - t0)
    return info


_local = threading.local()


def _backend(spec: BaseSpec, digest: str):
    """One backend per worker (process or thread) and spec: a GPU backend loads its weights once per worker, not
    once per shard. Per thread, because a diffusers pipeline must not run two batches at once."""
    cached = getattr(_local, "backend", None)
    if cached is None or cached[0] != digest:
        from flows.pipeline import backend_for

        _local.backend = cached = (digest, backend_for(spec))
    return cached[1]


# Handed to publish, which calls it before writing the manifest: a task run of its own inside the publish task.
def _card(folder: str, manifest: Any) -> None:
    interrupt.hold("card")  # testing hook: interrupt a publish half-way (samples.parquet written, no manifest)
    card(folder, manifest)


write_card = task(_card, name="dataset-card", task_run_name="dataset card")


@task(name="publish", task_run_name="publish {name} v{version}")
def publish_version(staging: Any, name: str, version: int, run_id: str | None) -> dict[str, Any]:
    """Publish the staged version atomically; the dataset card (its own task run) is written before the manifest."""
    pv = staging.publish(run_id=run_id, card=write_card)
    return {"name": pv.name, "version": int(pv.version), "uri": str(pv.uri)}


def _spec_name(spec: Any) -> str:
    try:
        return resolve_spec(spec)[0].name
    except Exception:
        return "dataset"


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    return f"build {_spec_name(flow_run.parameters.get('spec'))}"


def _cache_scope(staging: Any, root: str | None) -> str:
    """What a cached shard result is valid for: this staged version of this build under this store root."""
    where = getattr(staging, "version_dir", None) or getattr(staging, "staging_dir", None) or str(root)
    return f"{staging.name}|{getattr(staging, 'key', '')}|{staging.digest}|v{staging.version}|{where}"


def _store(root: str | None):
    from store import DatasetStore

    return DatasetStore(root)


# What a worker process imports before its first shard task: Prefect, this flow's task, the pipeline, the store.
SHARD_MODULES = ("annotators", "generators", "store", "flows.build")


def make_runner(runner: str = "local", workers: int | None = None, dask_address: str | None = None):
    """A task runner for shard tasks (``flows.runners.make_task_runner``; process-pool workers preload
    ``SHARD_MODULES``)."""
    from flows.runners import make_task_runner

    return make_task_runner(runner, workers, dask_address, preload=SHARD_MODULES)


def _default_task_runner():
    """The runner a plain call or a served run uses: the local default, or PAIRFORGE_RUNNER/_WORKERS/_DASK_ADDRESS
    (set by ``pairforge serve`` for the runs it starts in fresh processes)."""
    workers = os.environ.get("PAIRFORGE_WORKERS")
    return make_runner(os.environ.get("PAIRFORGE_RUNNER", "local"), int(workers) if workers else None,
                       os.environ.get("PAIRFORGE_DASK_ADDRESS") or None)


@flow(name="build-dataset", flow_run_name=_flow_run_name, validate_parameters=False, log_prints=False,
      task_runner=_default_task_runner())
def build_dataset(spec: Any, root: str | None = None, force_new: bool = False) -> dict[str, Any]:
    """Build and publish one version of the dataset ``spec`` describes (a path, YAML text or a mapping). When a
    published version has the same spec hash and code version, return it (``up_to_date``) unless ``force_new``."""
    from prefect.runtime import flow_run

    t0 = time.perf_counter()
    model, text = resolve_spec(spec)
    digest = spec_hash(model)
    version = code_version()
    st = _store(root)
    if not force_new:
        from flows.rebuild import check as check_rebuild

        same = check_rebuild(st, model, digest, version).up_to_date
        if same is not None:
            found = {"name": model.name, "version": same, "uri": st.root.uri(model.name, f"v{same}"),
                     "up_to_date": True, "samples": 0, "shards": 0, "reused": 0, "generated": 0, "qc_failed": 0,
                     "bytes": 0, "seconds": time.perf_counter() - t0, "spec_hash": digest, "code_version": version,
                     "flow_run_id": str(flow_run.id) if flow_run.id else None}
            _emit("up_to_date", **found)
            return found
    staging = st.open_build(model, text, digest, version)
    interrupt.track_build(staging, str(flow_run.id) if flow_run.id else None)
    interrupt.set_phase("building shards")
    shards = plan_shards(model.samples, model.shard_size)
    scope = _cache_scope(staging, root)
    _emit("plan", name=model.name, version=staging.version, shards=len(shards), samples=model.samples,
          finished=len(staging.finished_shards()))

    def submit(i: int, r: range, refresh: bool = False):
        t = build_shard.with_options(refresh_cache=True) if refresh else build_shard
        return t.submit(model, staging, i, r.start, r.stop, len(shards), scope)

    futures = {submit(i, r): i for i, r in enumerate(shards)}
    # While workers generate shards, this process waits: load the card's plotting stack now, off the publish path.
    threading.Thread(target=card_warm_up, name="card-imports", daemon=True).start()
    results: dict[int, dict] = {}
    for fut in as_completed(list(futures)):
        res = dict(fut.result())
        res["reused"] = bool(res.get("reused")) or fut.state.name == "Cached"
        results[futures[fut]] = res
        _emit("shard", **res)
    # The markers decide: a Prefect cache hit for a shard the staging area does not hold is redone.
    missing = sorted(set(range(len(shards))) - set(staging.finished_shards()))
    for i in missing:
        res = dict(submit(i, shards[i], refresh=True).result(), redone=True)
        results[i] = res
        _emit("shard", **res)

    run_id = str(flow_run.id) if flow_run.id else None
    interrupt.set_phase("publishing")
    _emit("publishing", name=model.name, version=staging.version)
    published = publish_version(staging, model.name, staging.version, run_id)
    interrupt.set_phase("finishing")
    interrupt.hold("published")
    summary = {
        **published,
        "samples": sum(r["n"] for r in results.values()),
        "shards": len(shards),
        "reused": sum(1 for r in results.values() if r["reused"]),
        "generated": sum(1 for r in results.values() if not r["reused"]),
        "qc_failed": sum(int(r.get("qc_failed") or 0) for r in results.values()),
        "bytes": sum(int(r.get("bytes") or 0) for r in results.values()),
        "seconds": time.perf_counter() - t0,
        "spec_hash": digest,
        "code_version": version,
        "flow_run_id": run_id,
    }
    _emit("published", **summary)
    return summary


def run_build(spec: Any, root: str | None = None, runner: str = "local", workers: int | None = None,
              dask_address: str | None = None, task_runner: Any = None, force_new: bool = False) -> dict[str, Any]:
    """Run ``build_dataset`` with the chosen task runner (see flows.runners), or with ``task_runner`` as given
    (e.g. a process pool whose workers were started while the API server started)."""
    tr = task_runner if task_runner is not None else make_runner(runner, workers, dask_address)
    try:
        return build_dataset.with_options(task_runner=tr)(spec, root=root, force_new=force_new)
    finally:
        close = getattr(tr, "close_prestarted", None)
        if close is not None:  # workers started for a run that never took them (e.g. it failed to start)
            close()
