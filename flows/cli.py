"""The ``pairforge`` command line: build, preview, inspect, pull, verify, export, schedule.

Exit codes: 0 success, 2 bad input (one line naming the problem), 1 failure (``--verbose`` for the traceback).
"""
from __future__ import annotations

from flows import settings  # noqa: F401  (Prefect defaults before prefect is imported)

import functools
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from flows import gcpause
from schemas.errors import SpecError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="pairforge: synthetic images with pixel-exact segmentation labels, from a spec.")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2

RootOpt = typer.Option(None, "--root", help="dataset root: a folder or fsspec URL (default: see `pairforge root`)")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="details, Prefect logs and tracebacks")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input. The store's errors (StoreError, IntegrityError, PublishError) are
    SpecError subclasses, so one type covers specs, options, roots, refs and missing versions."""
    return (SpecError,)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def handle_errors(fn: Callable) -> Callable:
    """Map exceptions to exit codes: bad input -> 2 with one line; anything else -> 1 (traceback with --verbose)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        verbose = bool(kwargs.get("verbose"))
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)
        except user_errors() as e:
            if verbose:
                traceback.print_exc()
            typer.echo(f"error: {_one_line(e)}", err=True)
            raise typer.Exit(EXIT_BAD_INPUT)
        except Exception as e:
            if verbose:
                traceback.print_exc()
            hint = "" if verbose else " (run with --verbose for the traceback)"
            typer.echo(f"error: {type(e).__name__}: {_one_line(e)}{hint}", err=True)
            raise typer.Exit(EXIT_FAILURE)

    return wrapper


def _quiet_prefect(verbose: bool) -> None:
    settings.apply_defaults(verbose)
    settings.silence_shutdown_noise()


# --------------------------------------------------------------------------------------------------- build
@app.command()
@handle_errors
def build(spec: str = typer.Argument(..., help="spec file (.yaml/.json)"),
          root: Optional[str] = RootOpt,
          runner: str = typer.Option("local", "--runner", help="local | threads | processes | dask | ray"),
          workers: Optional[int] = typer.Option(None, "--workers", "-w", help="parallel workers (default: CPU count)"),
          dask_address: Optional[str] = typer.Option(None, "--dask-address", help="existing Dask scheduler, tcp://host:port"),
          force_new: bool = typer.Option(False, "--force-new",
                                         help="make a new version even if one with this spec and code is published"),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress; only the final line"),
          as_json: bool = typer.Option(False, "--json", help="progress and result as JSON lines on stdout"),
          verbose: bool = VerboseOpt) -> None:
    """Build and publish a new version of the dataset SPEC describes (nothing new if it is up to date).

    The first Ctrl-C (or SIGTERM) stops the build within seconds and says what was finished; rerunning resumes.
    Exit codes: 0 published or up to date, 1 failure, 2 bad input, 130 / 143 interrupted by SIGINT / SIGTERM
    (the last line says whether the version was published before the signal)."""
    from flows import interrupt

    with interrupt.handling():
        _build(spec, root, runner, workers, dask_address, force_new, quiet, as_json, verbose)


def _build(spec: str, root: Optional[str], runner: str, workers: Optional[int], dask_address: Optional[str],
           force_new: bool, quiet: bool, as_json: bool, verbose: bool) -> None:
    # In the ``pairforge`` process (not a caller's, e.g. a test's CliRunner): the garbage collector is off while this
    # process imports the pipeline and Prefect, and on again, those imports frozen, before the flow runs (flows.gcpause:
    # ~0.6 s of this process's ~4 s of CPU walked long-lived modules and schemas).
    paused = _OWN_PROCESS and gcpause.pause()
    try:
        _quiet_prefect(verbose)
        # With no API in the environment, the local API server is launched now, in its own process: its ~7 s of
        # start-up then use the core this process leaves idle while it imports and checks the input (~1.7 s), instead
        # of all following them. Bad input still publishes nothing and leaves no server behind: it is stopped on the
        # way out.
        early = settings.launch_local_server(verbose)
        try:
            _build_checked(spec, root, runner, workers, dask_address, force_new, quiet, as_json, verbose, early,
                           paused)
        finally:
            if early is not None:
                early.stop()  # a no-op once prefect_api has stopped it
    finally:
        if paused and not gc.isenabled():  # stopped before the flow ran
            gc.enable()


def _build_checked(spec: str, root: Optional[str], runner: str, workers: Optional[int], dask_address: Optional[str],
                   force_new: bool, quiet: bool, as_json: bool, verbose: bool, early: Any,
                   paused: bool = False) -> None:
    import contextlib

    from flows.progress import channel, choose_mode, reporter

    from flows.inputs import check_root_writable, code_version, resolve_spec
    from flows.pipeline import backend_for
    from flows.rebuild import check as check_rebuild
    from flows.runners import check_runner, describe
    from schemas.spec import spec_hash

    from flows import allocator

    allocator.tune()  # PAIRFORGE_MALLOC=heap only; before the pool forks: workers inherit it (publish runs here too)
    mode = choose_mode(quiet, as_json)
    if mode == "json":
        from flows import interrupt

        interrupt.json_events()
    # Every input check runs before Prefect is imported or a flow starts, so bad input publishes nothing.
    model, text = resolve_spec(Path(spec))
    backend_for(model)  # unknown generator or option -> SpecError
    from flows.runners import default_workers
    from schemas.memory import check_memory

    check_memory(model, workers or (1 if dask_address or runner in ("dask", "ray") else default_workers()),
                 what=f"building {model.name}")  # before anything is allocated (per-worker memory, one shard each)
    check_root_writable(root)
    kind = check_runner(runner, workers, dask_address)
    rc = check_rebuild(_store(root), model, spec_hash(model), code_version())
    if rc.up_to_date is not None and not force_new:
        _say_up_to_date(mode, rc, _store(root).root.uri(model.name, f"v{rc.up_to_date}"))
        return
    if rc.latest is not None:
        if mode == "json":
            typer.echo(json.dumps({"event": "changed", "name": rc.name, "since": rc.latest, "changes": rc.changes,
                                   "forced": rc.up_to_date is not None}))
        elif mode != "quiet":
            out.print(rc.summary() if rc.up_to_date is None else f"{rc.summary()}; --force-new: building a new version")

    # The local API server starts in its own process while this one forks the workers that do the numpy work
    # (``local``: a compute pool, before Prefect is imported here; ``processes``: Prefect's pool, after) and imports
    # the flow. The workers begin the first shards at once (a head start, flows.head_start) instead of waiting
    # several seconds for the API and the flow run.
    prepared: dict[str, Any] = {}
    stack = contextlib.ExitStack()

    def report() -> None:
        # Entered after the pool's workers are forked: a progress bar runs a thread, and fork needs none.
        if "progress" not in prepared:
            prepared["progress"] = progress = stack.enter_context(reporter(mode, out))
            stack.enter_context(channel("pairforge_progress").reporting_to(progress))

    def begin_head_start(source: Any, commit: Any) -> None:
        if os.environ.get("PAIRFORGE_HEAD_START") == "0":
            return
        from flows import head_start, interrupt
        from schemas.plan import plan_shards

        staging = _store(root).open_build(model, text, spec_hash(model), code_version())
        head = head_start.begin(source, model, staging, plan_shards(model.samples, model.shard_size), commit,
                                emit=prepared["progress"])
        if head is not None:
            stack.callback(head.close)
            interrupt.track_build(staging, None)  # an interrupt now says what is staged

    began = time.perf_counter()  # the build's work begins here (the flow run's own clock starts later)
    pool = None
    if kind == "local":
        from flows.compute import ComputePool, commit_shard

        pool = ComputePool(workers or default_workers())
        stack.callback(pool.close)  # a no-op once the flow run's runner has stopped it
        pool.start()
        report()
        begin_head_start(pool, commit_shard)

    def prepare() -> None:
        from flows.build import commit_shard, make_runner

        tr = make_runner(runner, workers, dask_address, pool=pool)
        prepared["runner"] = tr.prestart() if hasattr(tr, "prestart") else tr
        report()
        # With an API already running too: the flow run still waits for Prefect's flow engine to be imported and
        # the run to be created (~2-3 s of this process).
        if pool is None and hasattr(tr, "prestarted_executor"):
            begin_head_start(tr, commit_shard)

    with stack, settings.prefect_api(verbose, while_starting=prepare, server=early) as api:
        from flows import build as b

        if verbose:
            err.print(f"Prefect API: {api}; runner: {describe(runner, workers, dask_address)}; "
                      f"code version {b.code_version()}")
        report()
        if paused:  # the imports are done: collect from here on, skipping what they made
            gcpause.resume()
        summary = b.run_build(str(Path(spec)), root=root, task_runner=prepared.get("runner"), force_new=force_new)
    if summary.get("up_to_date"):  # published by another build meanwhile
        rc.up_to_date = rc.latest = summary["version"]
        _say_up_to_date(mode, rc, summary["uri"])
        return
    if mode == "json":
        return  # the "published" event carried the summary
    if mode == "quiet":
        out.print(f"published {summary['name']}@v{summary['version']} at {summary['uri']}")
        return
    # Shards begun before the flow run existed (a head start) count: from the first shard to the published version.
    seconds = max(summary["seconds"], time.perf_counter() - began)
    rate = summary["samples"] / seconds if seconds else 0.0
    out.print(f"shards: {summary['generated']} generated, {summary['reused']} reused (of {summary['shards']})")
    out.print(f"samples: {summary['samples']} ({summary['qc_failed']} failed QC), "
              f"{seconds:.1f} s, {rate:.1f} samples/s overall")
    out.print(f"published {summary['name']}@v{summary['version']} at {summary['uri']}")


def _say_up_to_date(mode: str, rc: Any, uri: str) -> None:
    if mode == "json":
        typer.echo(json.dumps({"event": "up_to_date", "name": rc.name, "version": rc.up_to_date, "uri": uri}))
    else:
        out.print(f"{rc.summary()} at {uri} (same spec and code; --force-new makes a new version anyway)")


# --------------------------------------------------------------------------------------------------- parse / preview / schema
@app.command()
@handle_errors
def parse(text: str = typer.Argument(..., help='shorthand, e.g. "8mm solid nodule, right upper lobe"'),
          verbose: bool = VerboseOpt) -> None:
    """Parse shorthand text into a structured spec (JSON)."""
    from flows.preview import parse_text

    typer.echo(json.dumps(parse_text(text), indent=2, default=str))


@app.command()
@handle_errors
def preview(source: str = typer.Argument(..., help="spec file or shorthand text"),
            out_dir: Path = typer.Option(..., "--out", "-o", help="folder for the preview images"),
            n: int = typer.Option(4, "-n", help="number of samples"),
            seed: Optional[int] = typer.Option(None, "--seed", help="override the spec's seed"),
            overwrite: bool = typer.Option(False, "--overwrite", help="replace files of an earlier preview in --out"),
            verbose: bool = VerboseOpt) -> None:
    """Render a few samples with label outlines, without orchestration or publishing (an earlier preview's files in
    --out are kept unless --overwrite)."""
    from flows.preview import run_preview

    if n < 1:
        raise SpecError(f"-n must be at least 1, not {n}")
    paths = run_preview(source, out_dir, n, seed, overwrite=overwrite)
    for p in paths:
        out.print(str(p))


@app.command()
@handle_errors
def validate(spec: Path = typer.Argument(..., help="spec file (.yaml or .json)"),
             verbose: bool = VerboseOpt) -> None:
    """Check a spec without generating anything; print its normalised form's summary and hash."""
    from schemas.spec import load_spec, spec_hash

    model = load_spec(spec)
    out.print(f"ok: {model.name} ({model.domain}), {model.samples} samples, seed {model.seed}, "
              f"generator {model.generator.name}, spec hash {spec_hash(model)[:16]}")
    if verbose:
        typer.echo(json.dumps(model.model_dump(mode="json"), indent=2))


@app.command()
@handle_errors
def schema(verbose: bool = VerboseOpt) -> None:
    """Print the JSON schema of dataset specs."""
    from schemas.spec import spec_json_schema

    typer.echo(json.dumps(spec_json_schema(), indent=2))


# --------------------------------------------------------------------------------------------------- store commands
def _store(root: Optional[str]):
    from store import DatasetStore

    return DatasetStore(root)


@app.command("root")
@handle_errors
def root_(set_to: Optional[str] = typer.Option(None, "--set", help="make PATH (or an fsspec URL) your default root, "
                                                                    "in the user config"),
          verbose: bool = VerboseOpt) -> None:
    """Show which dataset root commands use here, and where that choice comes from.

    Order: --root, then $PAIRFORGE_ROOT, then root = "..." in the nearest pairforge.toml in this folder or above,
    then the user config (~/.config/pairforge/config.toml), then ~/.local/share/pairforge/datasets."""
    from store.config import HOW_TO_CHANGE, choose_root, describe, set_user_root

    if set_to is not None:
        path = set_user_root(set_to)
        out.print(f"wrote {path}")
    choice = choose_root(None)
    out.print(describe(choice))
    if set_to is None:
        out.print(HOW_TO_CHANGE)


@app.command("ls")
@handle_errors
def ls_(root: Optional[str] = RootOpt, verbose: bool = VerboseOpt) -> None:
    """List datasets and their published versions."""
    st = _store(root)
    if st.root.local and not os.path.exists(st.root.path):
        out.print(f"no datasets under {st.url} (the folder does not exist yet); {st.root.origin}")
        return
    names = st.list_datasets()
    if not names:
        out.print(f"no datasets under {st.url}; {st.root.origin}")
        return
    t = Table("dataset", "versions", "latest", "samples", "created (UTC)")
    for name in names:
        versions = st.versions(name)
        if not versions:
            t.add_row(name, "-", "-", "-", "(build in progress)")
            continue
        m = st.manifest(name, versions[-1])
        t.add_row(name, ", ".join(f"v{v}" for v in versions), f"v{versions[-1]}", str(m.counts.samples), m.created_at)
    out.print(t)


@app.command()
@handle_errors
def show(ref: str = typer.Argument(..., help="NAME, NAME@vN or NAME@latest"), root: Optional[str] = RootOpt,
         as_json: bool = typer.Option(False, "--json", help="print the whole manifest as JSON"),
         open_: bool = typer.Option(False, "--open", help="open the version's static browser (index.html)"),
         card: bool = typer.Option(False, "--card", help="print the dataset card (README.md) of the version"),
         verbose: bool = VerboseOpt) -> None:
    """Show a published version (the latest when none is given): counts, findings by kind, where its card is."""
    st = _store(root)
    if open_:
        from flows.browser import browser_url

        url = browser_url(st, ref)
        import webbrowser

        webbrowser.open(url)
        out.print(f"opened {url}")
        return
    if card:
        name, version = st.resolve(ref)
        uri = st.root.uri(name, f"v{version}", "README.md")
        typer.echo(st.root.read_bytes(st.root.join(name, f"v{version}", "README.md")).decode("utf-8"))
        err.print(f"(card: {uri}; its plots are in the card/ folder beside it)")
        return
    if as_json:
        name, version = st.resolve(ref)
        typer.echo(st.manifest(name, version).model_dump_json(indent=2))
        return
    out.print(st.show(ref), soft_wrap=True)


@app.command()
@handle_errors
def pull(ref: str = typer.Argument(..., help="NAME@vN (or NAME / NAME@latest)"),
         dest: str = typer.Argument(..., help="destination root: a folder or an fsspec URL (s3://bucket/prefix)"),
         root: Optional[str] = typer.Option(None, "--root", help="source root: a folder or fsspec URL (default: see "
                                                                 "`pairforge root`)"),
         workers: int = typer.Option(8, "--workers", min=1, max=256, help="files transferred at once"),
         limit_rate: Optional[str] = typer.Option(None, "--limit-rate", help="at most this many bytes/s, e.g. 20M"),
         quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
         as_json: bool = typer.Option(False, "--json", help="progress events and the result as JSON lines"),
         verbose: bool = VerboseOpt) -> None:
    """Copy a published version to DEST/NAME/vN, from any root to any root (local or S3), checking every sha256.

    Resumable: run it again after an interruption and the files already copied (sha256 checked) are kept. The version
    appears at DEST whole or not at all. Storage options (endpoints, keys) of s3:// roots come from [storage.s3] in
    pairforge.toml or the user config, or $PAIRFORGE_STORAGE_OPTIONS (see docs/store.md)."""
    from flows.transfer_progress import pull_reporter
    from store.transfer import parse_rate

    parse_rate(limit_rate)  # a bad rate is one line before anything is read
    st = _store(root)
    with pull_reporter(out, quiet=quiet, as_json=as_json) as rep:
        res = st.pull_to(ref, dest, workers=workers, limit_rate=limit_rate, progress=rep)
    if as_json:
        typer.echo(json.dumps({"event": "result", **res.__dict__}))
    elif not quiet:
        out.print(str(res))


@app.command()
@handle_errors
def verify(target: str = typer.Argument(..., help="an image file (PNG, JPEG, ... or one .nii.gz volume: reads its "
                                                    "watermark) or NAME@vN (checks every file)"),
           root: Optional[str] = RootOpt,
           as_json: bool = typer.Option(False, "--json", help="the result as one JSON object, with its verdict"),
           verbose: bool = VerboseOpt) -> None:
    """Identify an image by its watermark, or check every checksum of a published version.

    Exit codes, from any folder: 0 identified (an image whose mark names a dataset version and sample, intact,
    re-encoded or a modified copy: the verdict says which) or a version whose files all match; 1 no mark found, a
    mark the dataset contradicts (tampered), or a version with a missing or changed file; 2 bad input."""
    import store

    if os.path.isfile(target):
        res = store.verify_image(target, root=root)
        ok = res.identified
        data = res.as_dict()
    else:
        if "@" not in target and (os.sep in target or Path(target).suffix):
            raise SpecError(f"{target!r} is neither an existing file nor a dataset reference NAME@vN")
        res = store.verify_version(target, root=root)
        ok = res.ok
        data = {"ref": res.ref, "files_checked": res.files_checked, "problems": res.problems,
                "verdict": "intact" if ok else "tampered"}
    if as_json:
        typer.echo(json.dumps({**data, "exit_code": EXIT_OK if ok else EXIT_FAILURE}, default=str))
    else:
        if hasattr(res, "verdict"):
            out.print(f"{res} [{res.verdict}]", soft_wrap=True)
        else:  # a version: the verdict, then one line per damaged file
            for line in res.lines():
                out.print(line, soft_wrap=True, markup=False)
    if not ok:
        raise typer.Exit(EXIT_FAILURE)


# --------------------------------------------------------------------------------------------------- serve
@app.command("gc")
@handle_errors
def gc_(root: Optional[str] = RootOpt,
        older_than: str = typer.Option("1h", "--older-than", help="only builds with no sign of life for this long "
                                       "(90s, 30m, 1h, 2d)"),
        yes: bool = typer.Option(False, "--yes", help="remove them (without it: list only, a dry run)"),
        verbose: bool = VerboseOpt) -> None:
    """List the staging areas of dead builds (no heartbeat, lease or write for --older-than); --yes removes them.
    A live build's staging is never listed. Published versions and reserved numbers are never touched."""
    from store.gc import collect, parse_duration

    threshold = parse_duration(older_than)
    st = _store(root)
    if st.root.local and not os.path.isdir(st.root.path):
        out.print(f"nothing to collect under {st.url} (the folder does not exist); {st.root.origin}")
        return
    rep = collect(st.root, threshold, remove=yes)
    for g in rep.dead:
        out.print(("removed " if g.removed else ("kept (live again) " if yes else "dead ")) + g.describe())
    live = f"; {len(rep.live)} live build{'s' if len(rep.live) != 1 else ''} left alone" if rep.live else ""
    if not rep.dead:
        out.print(f"no dead builds older than {older_than} under {st.url}{live}")
    elif yes:
        out.print(f"removed {rep.removed} of {len(rep.dead)} dead build leftovers under {st.url}{live}")
    else:
        out.print(f"{len(rep.dead)} dead build leftovers under {st.url}{live}; dry run: rerun with --yes to remove")


@app.command()
@handle_errors
def serve(specs: List[str] = typer.Argument(..., help="spec files; each becomes one scheduled deployment"),
          root: Optional[str] = RootOpt,
          runner: str = typer.Option("local", "--runner", help="local | threads | processes | dask | ray"),
          workers: Optional[int] = typer.Option(None, "--workers", "-w"),
          verbose: bool = VerboseOpt) -> None:
    """Serve one deployment per spec, each on the cron of its spec's ``schedule:`` (Ctrl-C stops)."""
    _quiet_prefect(verbose)
    from flows.serve import deployments_for, serve_deployments

    deps = deployments_for(specs, root=root, runner=runner, workers=workers)  # validates every spec first
    for d, spec_name, cron in deps:
        out.print(f"deployment [bold]{d.name}[/]: {spec_name} on cron {cron!r}")
    with settings.prefect_api(verbose, services=True) as api:
        out.print(f"serving {len(deps)} deployment(s) against {api}; Ctrl-C to stop")
        serve_deployments([d for d, _, _ in deps])


# --------------------------------------------------------------------------------------------------- export
def _parse_options(pairs: List[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    for p in pairs:
        key, eq, value = p.partition("=")
        if not eq or not key.strip():
            raise SpecError(f"--option {p!r} is not KEY=VALUE, e.g. --option class_name=plate")
        opts[key.strip()] = value
    return opts


def _print_export(res: dict[str, Any], ref: str) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in sorted((res.get("counts") or {}).items()))
    out.print(f"exported {res.get('source', ref)} as {res.get('format')} to {res.get('path')}"
              + (f" ({counts})" if counts else ""))


@app.command("export")
@handle_errors
def export_cmd(fmt: str = typer.Argument(..., metavar="FORMAT", help="export format, e.g. mvtec"),
               ref: str = typer.Argument(..., help="NAME@vN"),
               dest: Path = typer.Argument(..., help="destination folder"),
               split: List[str] = typer.Option([], "--split", help="only these splits (repeat or comma-separate)"),
               classes: List[str] = typer.Option([], "--classes",
                                                 help="only samples whose findings are of these kinds"),
               overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing export"),
               option: List[str] = typer.Option([], "--option", help="format option KEY=VALUE (repeatable)"),
               root: Optional[str] = RootOpt, verbose: bool = VerboseOpt) -> None:
    """Export a published version to another tool's layout, reading every file through its sha256 check."""
    from store.export import export_version, get_format

    get_format(fmt)  # an unknown format is refused before the store is touched
    res = export_version(root, ref, fmt, dest, split=split or None, classes=classes or None, overwrite=overwrite,
                         **_parse_options(option))
    _print_export(res, ref)


@app.command("export-mvtec")
@handle_errors
def export_mvtec_cmd(ref: str = typer.Argument(..., help="NAME@vN"),
                     dest: Path = typer.Argument(..., help="destination folder"),
                     class_name: str = typer.Option(..., "--class-name", help="MVTec class folder name"),
                     include_failed: bool = typer.Option(False, "--include-failed",
                                                         help="also export samples that failed QC"),
                     overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing class folder"),
                     root: Optional[str] = RootOpt, verbose: bool = VerboseOpt) -> None:
    """Deprecated alias of `pairforge export mvtec NAME@vN DEST --option class_name=C`."""
    from store.export import export_version

    res = export_version(root, ref, "mvtec", dest, overwrite=overwrite, class_name=class_name,
                         include_failed=include_failed)
    _print_export(res, ref)
    # After the export: a refusal stays one line.
    typer.echo(f"note: export-mvtec is deprecated; use: pairforge export mvtec {ref} {dest} "
               f"--option class_name={class_name}", err=True)


# --------------------------------------------------------------------------------------------------- train
@app.command()
@handle_errors
def train(spec: Path = typer.Argument(..., help="training spec (.yaml/.json)"),
          out_dir: Path = typer.Option(..., "--out", "-o", help="model folder to write (working files go to OUT.work)"),
          verbose: bool = VerboseOpt) -> None:
    """Train a label-map -> image model on your pairs (resumes from the last checkpoint when rerun)."""
    _quiet_prefect(verbose)
    from flows.train import check_inputs, resolve_train_spec

    model, _ = resolve_train_spec(spec)  # bad input costs no server start
    check_inputs(model)
    with settings.prefect_api(verbose):
        from flows.progress import TrainBar
        from flows.train import reporting_to, train_model

        with TrainBar(out, enabled=sys.stdout.isatty() or verbose) as progress, reporting_to(progress):
            summary = train_model(str(spec), str(out_dir))
    rate = summary.get("steady_images_per_s")
    out.print(f"trained {summary['step']}/{summary['steps']} steps on {summary['data']['pairs']} pairs "
              f"({summary['device']}, {summary['precision']}), final loss {summary['final_loss']}"
              + (f", {rate:.1f} images/s" if rate else ""))
    out.print(f"model: {summary['model']}")


# --------------------------------------------------------------------------------------------------- evaluate
MAX_EVAL_SEEDS = 100
@app.command()
@handle_errors
def evaluate(ref: str = typer.Argument(..., help="NAME@vN to evaluate"),
             real: Optional[str] = typer.Option(None, "--real", help="reference: a folder (NIfTI/DICOM/PNG), NAME@vM, "
                                                "or a built-in reference set of the domain, NAME[:N] (chest_ct: "
                                                "standin = differently-configured phantom, NOT real; "
                                                "ct_small_inserted = real CT slice with synthetic nodules)"),
             against: Optional[str] = typer.Option(None, "--against", help="NAME@vM to evaluate the same way and "
                                                   "print side by side"),
             train_ref: Optional[str] = typer.Option(None, "--train-ref", help="the generator's training data "
                                                     "(memorisation check)"),
             features: Optional[str] = typer.Option(None, "--features", help="feature extractor on disk: "
                                                    "weights.safetensors with weights.safetensors.json"),
             steps: int = typer.Option(400, "--steps", help="segmenter training steps"),
             limit: Optional[int] = typer.Option(None, "--limit", help="at most this many samples per set"),
             utility: bool = typer.Option(True, "--utility/--no-utility", help="TSTR and augmentation study"),
             ks: str = typer.Option("10,50,200", "--ks", help="real training sizes of the augmentation study"),
             seeds: int = typer.Option(3, "--seeds", help="seeds per arm"),
             n_synthetic: int = typer.Option(200, "--n-synthetic", help="synthetic images added per arm"),
             device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
             root: Optional[str] = RootOpt, verbose: bool = VerboseOpt) -> None:
    """Evaluate a version: label fidelity, realism, utility, memorisation; writes evaluation.json and a card."""
    _quiet_prefect(verbose)
    try:
        k_list = tuple(int(x) for x in ks.split(",") if x.strip())
    except ValueError:
        raise SpecError(f"--ks {ks!r}: write comma-separated numbers, e.g. 10,50,200") from None
    if not 1 <= seeds <= MAX_EVAL_SEEDS:  # checked before range(seeds) is made
        raise SpecError(f"--seeds must be 1 to {MAX_EVAL_SEEDS}, not {seeds}")
    options = {"steps": steps, "limit": limit, "utility": utility, "ks": k_list, "seeds": tuple(range(seeds)),
               "n_synthetic": n_synthetic, "device": device, "features": features, "train_ref": train_ref}
    from flows.evaluate import load_feature_extractor, options_from
    from store import DatasetStore

    options_from(options)
    if features:  # refused files stop here, in one line, before the flow starts
        load_feature_extractor(features)
    st = DatasetStore(root)
    for r in (ref, against):
        if r:
            st.resolve(r)
    with settings.prefect_api(verbose):
        from flows.evaluate import evaluate_dataset, side_by_side

        reports = evaluate_dataset(ref, real=real, against=against, root=root, options=options)
    a = reports["evaluated"]
    lf = a["label_fidelity"]
    out.print(f"{a['version']}: label fidelity {'passed' if lf['passed'] else 'FAILED'} "
              f"({lf['failing']} of {lf['findings']} findings fail)")
    if "against" in reports:
        b = reports["against"]
        t = Table("metric", a["version"], b["version"])
        for row in side_by_side(a, b):
            t.add_row(*row)
        out.print(t)
        out.print(f"written: {b['folder']}")
    out.print(f"written: {a['folder']}")


@functools.lru_cache(maxsize=1)
def _click_group():
    """The Click group typer makes of ``app`` (built once: ~0.1 s of work that an in-process caller, e.g. the
    argument fuzzer, would otherwise pay per call)."""
    return typer.main.get_command(app)


def run(argv: Optional[List[str]] = None, prog_name: str = "pairforge") -> int:
    """Run the command line in this process and return its exit code (``main`` exits with it).

    Usage errors (unknown option, missing or malformed argument) end like any other bad input: one line on stderr
    naming the problem and where help is, exit code 2."""
    from typer import _click as click  # typer 0.29 carries its own click
    from typer import exceptions as typer_exceptions

    try:
        rv = _click_group().main(args=argv, prog_name=prog_name, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.NoArgsIsHelpError:
        return 0  # the help was printed (to stdout) when the error was made
    except click.exceptions.UsageError as e:
        cmd = e.ctx.command_path if e.ctx is not None else prog_name
        typer.echo(f"error: {_one_line(e.format_message())} (see: {cmd} --help)", err=True)
        return EXIT_BAD_INPUT
    except click.exceptions.ClickException as e:
        typer.echo(f"error: {_one_line(e.format_message())}", err=True)
        return e.exit_code
    except typer_exceptions.Abort:
        typer.echo("aborted", err=True)
        return EXIT_FAILURE
    except SystemExit as e:
        code = e.code
        if code is None or isinstance(code, int):
            return 0 if code is None else code
        print(code, file=sys.stderr)
        return EXIT_FAILURE


_OWN_PROCESS = False  # True in the ``pairforge`` command's own process (main), where pairforge owns the collector


def main() -> None:
    global _OWN_PROCESS
    _OWN_PROCESS = True
    _exit(run())


def _exit(code: int) -> None:
    """Exit after the interpreter's exit handlers, skipping its module teardown: with Prefect, matplotlib and
    pandas loaded that teardown alone took ~0.6 s here and does nothing a finished command needs (files are
    closed, the handlers have run, output is flushed)."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
