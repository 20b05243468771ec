"""The build flow: spec -> deterministic shard plan -> one long-lived Prefect task per worker ("lane"), each
committing its share of the shards one by one -> publish + dataset card.

A recipe of calls into the library: ``flows.pipeline.make_samples`` generates a shard, the store's
``BuildStaging.write_shard`` commits it, ``BuildStaging.publish`` makes the version visible. The staging
area's per-shard commit markers are the source of truth for resuming and retrying: a lane skips every shard whose
marker exists, so a retried or resumed lane redoes only unfinished shards. The unit of scheduling (a lane) is thus
decoupled from the unit of retry and resume (a shard): Prefect's per-task cost is paid per worker, not per shard,
and each committed shard is still logged by its lane and reported as progress by the flow.
"""
from __future__ import annotations

from flows import settings  # noqa: F401  (Prefect defaults before prefect is imported)

import concurrent.futures as cf
import contextlib
import functools
import os
import sys
import threading
import time
from typing import Any, Callable

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.tasks import exponential_backoff

from flows import interrupt
# commit_shard and _backend are re-exported: what a shard does lives with the compute pool, which never imports Prefect
from flows.compute import _backend, commit_shard, run_plots, run_shard  # noqa: F401
from flows.head_start import claim_shard, plan_events, release_shard
from flows.card import card
from flows.card import warm_up as card_warm_up
from flows.progress import channel
from schemas.errors import SpecError
from schemas.plan import plan_shards
from flows.inputs import check_root_writable, code_version, resolve_spec  # noqa: F401  (re-exported)
from schemas.spec import BaseSpec, spec_hash

# Errors worth another try: storage and network hiccups. Bad input (SpecError) and bugs are not retried.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, ConnectionError, TimeoutError)

PROGRESS_POLL_S = 1.0  # how often the flow looks for newly committed shards while lanes run

_events = channel("pairforge_progress")  # the CLI may have made it first (a head start reports before this import)
reporting_to = _events.reporting_to  # send build events (plan, shard, published) to fn while the flow runs here
_emit = _events.emit


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


def _lane_run_name() -> str:
    from prefect.runtime import task_run

    p = task_run.parameters
    n = len(p["shards"])
    if p.get("claims"):  # lanes that take the next unclaimed shard of one shared list
        return f"shards lane {p['lane'] + 1}/{p['n_lanes']} (sharing {n} shard{'s' if n != 1 else ''} of {p['n_shards']})"
    return f"shards lane {p['lane'] + 1}/{p['n_lanes']} ({n} shard{'s' if n != 1 else ''} of {p['n_shards']})"


@task(name="shard-lane",
      task_run_name=_lane_run_name,
      # A retry runs the lane again; shards whose commit marker exists are skipped, so only unfinished work is redone.
      retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
      retry_condition_fn=_is_transient,
      # The staging markers are the record of finished shards; a result cache would only cost input hashing.
      cache_policy=NO_CACHE)
def build_lane(spec: BaseSpec, staging: Any, lane: int, n_lanes: int, shards: list[tuple[int, int, int]],
               n_shards: int, claims: str | None = None) -> list[dict[str, Any]]:
    """Generate and commit the shards ``(index, start, stop)`` of one lane, one after another, skipping any whose
    marker exists. One long-lived task per worker: Prefect's per-task cost is paid per lane, not per shard.
    With ``claims`` (a local folder shared by the lanes of one pool: flows.head_start) every lane gets the same list
    and takes only the shards it claims first, so lanes that started late or ran slow stay balanced."""
    from prefect import get_run_logger

    log = get_run_logger()
    out = []
    for i, start, stop in shards:
        if claims is not None and not claim_shard(claims, i):
            continue  # another lane (or the head start) has it
        if staging.has_shard(i):
            out.append({"shard": i, "n": stop - start, "reused": True, "seconds": 0.0})
            continue
        try:
            info = run_shard(spec, staging, i, start, stop)  # in the compute pool where the runner has one
        except BaseException:
            if claims is not None:
                release_shard(claims, i)  # a retry of this lane (or the flow's redo) claims it again
            raise
        log.info("shard %d/%d: %d samples in %.1f s (lane %d/%d)", i + 1, n_shards, info["n"], info["seconds"],
                 lane + 1, n_lanes)
        out.append(info)
    return out


def _take_head_start(staging: Any):
    if "flows.head_start" not in sys.modules:  # only the CLI begins one
        return None
    return sys.modules["flows.head_start"].take(staging)


def _ranges(ids: list[int]) -> str:
    """1-based shard numbers as ranges: [0, 1, 2, 5] -> "1-3, 6"."""
    out, start = [], None
    for k, i in enumerate(ids):
        if start is None:
            start = i
        if k + 1 == len(ids) or ids[k + 1] != i + 1:
            out.append(f"{start + 1}" if start == i else f"{start + 1}-{i + 1}")
            start = None
    return ", ".join(out)


def plan_lanes(pending: list[int], n_lanes: int) -> list[list[int]]:
    """Deal the pending shards round-robin to at most ``n_lanes`` lanes (shards are equal-sized, so lanes are
    balanced by count; the tail is at most one shard, as in a pool that maps shards one by one)."""
    n = max(1, min(n_lanes, len(pending)))
    return [pending[k::n] for k in range(n)] if pending else []


# Handed to publish, which calls it before writing the manifest: a task run of its own inside the publish task.
def _card(folder: str, manifest: Any, storage_options: dict | None = None, plots: Any = None) -> None:
    interrupt.hold("card")  # testing hook: interrupt a publish half-way (samples.parquet written, no manifest)
    card(folder, manifest, storage_options=storage_options, plots=plots)


write_card = task(_card, name="dataset-card", task_run_name="dataset card", cache_policy=NO_CACHE)


# The card's plots, drawn by one of the workers (idle once the shards are written: the compute pool's, or the task
# runner's own) while publish writes samples.parquet and the browser in this process: publishing uses both cores.
card_plots = task(run_plots, name="dataset-card-plots", task_run_name="dataset card: plots", cache_policy=NO_CACHE)


class _Pending:
    """A card-plots future as ``card(plots=)`` takes it: a plain callable, so that Prefect passes it to the publish
    task as it is instead of waiting for the future before publish starts."""

    def __init__(self, future: Any):
        self.future = future

    def __call__(self) -> dict[str, Any]:
        return self.future.result()


@task(name="publish", task_run_name="publish {name} v{version}", cache_policy=NO_CACHE)
def publish_version(staging: Any, name: str, version: int, run_id: str | None,
                    plots: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Publish the staged version atomically; the dataset card (its own task run) is written before the manifest.
    ``plots``: the card's plots being drawn elsewhere (``card(plots=)``)."""
    write = write_card if plots is None else functools.partial(write_card, plots=plots)
    pv = staging.publish(run_id=run_id, card=write)
    return {"name": pv.name, "version": int(pv.version), "uri": str(pv.uri)}


def _spec_name(spec: Any) -> str:
    try:
        return resolve_spec(spec)[0].name
    except Exception:
        return "dataset"


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    return f"build {_spec_name(flow_run.parameters.get('spec'))}"


def _plots_here() -> bool:
    """Whether the card's plots are drawn in this process: the flow run's task runner runs tasks here (threads)
    and hands them to no compute pool."""
    from prefect.context import FlowRunContext
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.compute import active

    ctx = FlowRunContext.get()
    return active() is None and (ctx is None or isinstance(ctx.task_runner, ThreadPoolTaskRunner))


def lane_count(n_pending: int) -> int:
    """Lanes for this flow run: one per worker of its task runner, or one per shard where the runner does not say
    how many workers it has (an existing Dask or Ray cluster)."""
    from prefect.context import FlowRunContext

    from flows.runners import parallelism

    ctx = FlowRunContext.get()
    n = parallelism(ctx.task_runner) if ctx is not None else None
    return max(1, min(n_pending, n or n_pending))


def _store(root: str | None, storage_options: dict | None = None):
    from store import DatasetStore

    return DatasetStore(root, storage_options)


# What a Prefect process pool's worker (``--runner processes``: lanes run in the workers) imports before its first
# task: Prefect, this flow's task, the pipeline, the store, what pyarrow imports on a shard's first write
# (flows.shard_imports) and the card's plotting stack, for the card's plots drawn by a worker at the end
# (flows.card_imports); forked workers inherit it all. The default runner's compute pool imports
# ``flows.compute.COMPUTE_MODULES`` (the same without Prefect).
SHARD_MODULES = ("annotators", "generators", "store", "flows.build", "flows.shard_imports", "flows.card_imports")


def make_runner(runner: str = "local", workers: int | None = None, dask_address: str | None = None,
                pool: Any = None):
    """A task runner for shard tasks (``flows.runners.make_task_runner``; process-pool workers preload
    ``SHARD_MODULES``). ``pool``: a compute pool started already (``flows.compute.ComputePool``), for ``local``."""
    from flows.runners import make_task_runner

    return make_task_runner(runner, workers, dask_address, preload=SHARD_MODULES, pool=pool)


def _default_task_runner():
    """The runner a plain call or a served run uses: the local default, or PAIRFORGE_RUNNER/_WORKERS/_DASK_ADDRESS
    (set by ``pairforge serve`` for the runs it starts in fresh processes)."""
    workers = os.environ.get("PAIRFORGE_WORKERS")
    return make_runner(os.environ.get("PAIRFORGE_RUNNER", "local"), int(workers) if workers else None,
                       os.environ.get("PAIRFORGE_DASK_ADDRESS") or None)


@flow(name="build-dataset", flow_run_name=_flow_run_name, validate_parameters=False, log_prints=False,
      task_runner=_default_task_runner())
def build_dataset(spec: Any, root: str | None = None, force_new: bool = False,
                  storage_options: dict | None = None) -> dict[str, Any]:
    """Build and publish one version of the dataset ``spec`` describes (a path, YAML text or a mapping). When a
    published version has the same spec hash and code version, return it (``up_to_date``) unless ``force_new``.
    ``storage_options`` go to fsspec (an object store's endpoint and keys), as for ``DatasetStore``."""
    from prefect.runtime import flow_run

    t0 = time.perf_counter()
    model, text = resolve_spec(spec)
    from schemas.memory import check_memory

    check_memory(model, what=f"building {model.name}")  # one worker's shard at least; the CLI counts its workers
    digest = spec_hash(model)
    version = code_version()
    st = _store(root) if storage_options is None else _store(root, storage_options)
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
    # A heartbeat while this build runs: `pairforge gc` never removes a staging area whose heartbeat is fresh.
    heartbeat = staging.heartbeat()
    try:
        return _build_staged(st, staging, model, text, digest, version, flow_run, t0)
    finally:
        heartbeat.stop()


def _build_staged(st, staging, model, text, digest, version, flow_run, t0) -> dict[str, Any]:
    interrupt.track_build(staging, str(flow_run.id) if flow_run.id else None)
    interrupt.set_phase("building shards")
    shards = plan_shards(model.samples, model.shard_size)
    head = _take_head_start(staging)
    seen: set[int] = set()
    if head is None:
        finished = set(staging.finished_shards())
        claimed: set[int] = set()
        for ev in plan_events(staging, shards, finished):
            _emit(ev.pop("event"), **ev)
    else:  # the CLI announced the plan and began these shards before this run existed (flows.head_start)
        claimed, finished, seen = head.take_over(), set(head.finished), set(head.reported)
        if claimed:
            from prefect import get_run_logger

            get_run_logger().info("shards %s (%d of %d) were begun before this flow run started (while the Prefect "
                                  "API started or the flow was imported); the lanes take the rest",
                                  _ranges(sorted(claimed)), len(claimed), len(shards))
    seen |= finished
    pending = [i for i in range(len(shards)) if i not in finished and i not in claimed]
    results: dict[int, dict] = {i: {"shard": i, "n": len(shards[i]), "reused": True, "seconds": 0.0}
                                for i in sorted(finished)}

    def record(res: dict, redone: bool) -> None:
        res = dict(res, reused=res["shard"] in finished)
        results[res["shard"]] = res
        if res["shard"] not in seen:
            _emit("shard", **res, **({"redone": True} if redone else {}))
            seen.add(res["shard"])

    def run_lanes(todo: list[int], n_lanes: int, redone: bool = False, early: list | None = None,
                  claims: str | None = None) -> None:
        if claims is not None:  # every lane gets the whole list and claims as it goes (flows.head_start)
            lanes = [todo] * max(1, min(n_lanes, len(todo))) if todo else []
        else:
            lanes = plan_lanes(todo, n_lanes)
        futures = [build_lane.submit(model, staging, k, len(lanes), [(i, shards[i].start, shards[i].stop) for i in lane],
                                     len(shards), **({"claims": claims} if claims is not None else {}))
                   for k, lane in enumerate(lanes)]
        early = list(early or [])  # a head start's jobs (concurrent.futures), ahead of the lanes in the pool
        # Lanes report per shard through the staging markers: poll them for progress while the lanes run.
        while futures or early:
            if futures:
                done = wait(futures, timeout=PROGRESS_POLL_S).done
            else:
                done = set()
                cf.wait(early, timeout=PROGRESS_POLL_S)
            with contextlib.suppress(Exception):
                new = sorted(set(staging.finished_shards()) - seen)
                for i in new:
                    _emit("shard", shard=i, n=len(shards[i]), reused=False, **({"redone": True} if redone else {}))
                seen.update(new)
            for fut in done:
                futures.remove(fut)
                for res in fut.result():
                    record(res, redone)
            for job in [f for f in early if f.done()]:
                early.remove(job)
                for res in job.result():
                    if "error" in res:  # no marker: run again below as a task run, with retries
                        from prefect import get_run_logger

                        get_run_logger().warning("shard %d begun while the API started failed (%s); it runs again "
                                                 "as a task", res["shard"] + 1, res["error"])
                        failed_early.append(res["shard"])
                    else:
                        record(res, redone)

    # While workers generate shards, this process waits: load what publish imports now, off the publish path (the
    # card's plotting stack only where its plots are drawn in this process: a thread pool's tasks).
    threading.Thread(target=card_warm_up, kwargs={"plots": _plots_here()}, name="card-imports", daemon=True).start()
    failed_early: list[int] = []
    try:
        if head is None:
            run_lanes(pending, lane_count(len(pending)))
        else:  # the head start's jobs finish the shard they hold; the lanes share the rest through its claims
            run_lanes(pending, lane_count(len(pending)), early=head.futures, claims=str(head.folder))
    finally:
        if head is not None:
            head.close()
    if failed_early:
        run_lanes(sorted(failed_early), 1)
    # The markers decide: a shard the staging area does not hold (a marker lost meanwhile) is generated again.
    missing = sorted(set(range(len(shards))) - set(staging.finished_shards()))
    if missing and staging._published_here() is not None:
        missing = []  # another process building the same spec published it meanwhile (and removed the staging)
    if missing:
        finished -= set(missing)
        seen.difference_update(missing)  # their redo is reported again, as "redone"
        run_lanes(missing, 1, redone=True)

    run_id = str(flow_run.id) if flow_run.id else None
    interrupt.set_phase("publishing")
    _emit("publishing", name=model.name, version=staging.version)
    plots = card_plots.submit(staging, model.domain) if staging._published_here() is None else None
    published = publish_version(staging, model.name, staging.version, run_id,
                                plots=_Pending(plots) if plots is not None else None)
    if plots is not None:  # done unless another build published this version meanwhile: no task outlives the run
        plots.wait()
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
              dask_address: str | None = None, task_runner: Any = None, force_new: bool = False,
              storage_options: dict | None = None) -> dict[str, Any]:
    """Run ``build_dataset`` with the chosen task runner (see flows.runners), or with ``task_runner`` as given
    (e.g. a process pool whose workers were started while the API server started)."""
    tr = task_runner if task_runner is not None else make_runner(runner, workers, dask_address)
    try:
        return build_dataset.with_options(task_runner=tr)(spec, root=root, force_new=force_new,
                                                          storage_options=storage_options)
    finally:
        close = getattr(tr, "close_prestarted", None)
        if close is not None:  # workers started for a run that never took them (e.g. it failed to start)
            close()
