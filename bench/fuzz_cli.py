"""Fuzzing every ``pairforge`` subcommand's arguments in process, inside a sandbox folder.

One target per subcommand (read from the command line's own Click tree, so a new subcommand is fuzzed too). An
input is an argument vector: the subcommand, its positionals and options in any order, hostile values (names with
``../``, absolute paths, confusables, fullwidth digits, huge numbers, NaN, empty strings, ``NAME@v0``,
``NAME@v-1``, ``NAME@vabc``, missing, empty, truncated and non-spec files, unknown flags) drawn by hypothesis.
It runs through ``flows.cli.run`` (what ``pairforge`` runs, less the process exit) and must end:

- exit 0 (no traceback on stderr), or
- exit 2 with exactly one line on stderr, or
- for ``verify`` only, exit 1 with nothing on stderr (the documented "no mark / tampered" verdict),

never another exit code, an exception out of the command line, a run over ``HANG_S`` seconds, or a write outside
the sandbox. Writes are watched by an audit hook (``open`` for writing, mkdir, rename, remove, rmtree, ...) that
refuses (PermissionError) every write outside the sandbox (byte-compiled caches and Prefect's own home excepted):
one to a path no argument names is a defect; one to a path an argument names (``--root /proc/nope``) is what the
user asked for, and the command must then end as on any unwritable path (exit 2, one line). At the end the
sandbox's parent folder is compared with its state before.

The sandbox holds a dataset root with one published two-sample version ``fz@v1`` (built without orchestration),
its spec, a watermarked image of it, and hostile files. Commands stop where orchestration would start
(``flows.settings.prefect_api``): reaching it counts as accepted (every input check runs before it, by design), so
fuzzing starts no Prefect server and builds nothing; ``$BROWSER`` is ``true`` so ``show --open`` opens nothing.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import string
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from bench.fuzz_targets import Defect, time_limit

HANG_S = 60.0  # a whole command (imports, a preview render, an export) under load; a hang is far longer


class ReachedOrchestration(BaseException):
    """Raised where a command would start Prefect: every input check has passed (a BaseException, so the command
    line's own error mapping does not turn it into an exit code)."""


# ------------------------------------------------------------------------------------------------ the sandbox
FZ_SPEC = """\
name: fz
domain: chest_ct
samples: 2
seed: 5
shard_size: 2
image: {size: 128, spacing_mm: 1.4}
findings:
  negatives: 0
  mixture: ["8mm solid nodule, right upper lobe"]
"""


class Sandbox:
    """A temp folder the fuzzed commands run in: cwd, HOME, XDG folders, TMPDIR and a dataset root all inside."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="pairforge-clifuzz-")).resolve()
        self.sb = self.base / "sb"
        self.cwd = self.sb / "a" / "b" / "c" / "work"  # four '../' still stay inside the sandbox
        self.root = self.sb / "root"
        self.files = self.sb / "files"
        for d in (self.cwd, self.files, self.sb / "home", self.sb / "xdg-config", self.sb / "xdg-data",
                  self.sb / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        self._env_before: dict[str, str | None] = {}
        self.violations: list[str] = []  # writes outside the sandbox that no argument named (defects)
        self.directed = 0  # writes outside the sandbox to a path an argument named (refused by the watch)

    # -- environment
    ENV = ("HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "TMPDIR", "BROWSER", "PAIRFORGE_ROOT", "PAIRFORGE_PLUGINS")

    def enter(self) -> None:
        for k in self.ENV:
            self._env_before[k] = os.environ.get(k)
        os.environ.update(HOME=str(self.sb / "home"), XDG_CONFIG_HOME=str(self.sb / "xdg-config"),
                          XDG_DATA_HOME=str(self.sb / "xdg-data"), TMPDIR=str(self.sb / "tmp"), BROWSER="true")
        os.environ["PAIRFORGE_ROOT"] = str(self.root)  # refs resolve without --root (which is fuzzed too)
        os.environ.pop("PAIRFORGE_PLUGINS", None)
        self._tempdir = tempfile.tempdir
        tempfile.tempdir = str(self.sb / "tmp")
        self._cwd = os.getcwd()
        os.chdir(self.cwd)

    def leave(self) -> None:
        os.chdir(self._cwd)
        tempfile.tempdir = self._tempdir
        for k, v in self._env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    # -- contents
    def populate(self) -> None:
        """Publish fz@v1 (no orchestration: the store's own staging and publish) and write the hostile files."""
        from flows.inputs import code_version
        from flows.pipeline import make_samples
        from schemas.spec import load_spec_text, spec_hash
        from store import DatasetStore

        spec = load_spec_text(FZ_SPEC)
        digest = spec_hash(spec)
        staging = DatasetStore(str(self.root)).open_build(spec, FZ_SPEC, digest, code_version())
        for i, rng in enumerate(staging.shards):
            staging.write_shard(i, make_samples(spec, rng, digest=digest))
        staging.publish()
        import flows.evaluate  # noqa: F401  (torch and friends: imported once here, not inside a timed input)

        f = self.files
        (f / "fz.yaml").write_text(FZ_SPEC)
        (f / "fz.json").write_text('{"name": "fz2", "samples": 1, "image": {"size": 64}, '
                                   '"findings": {"negatives": 1}}')
        png = next((self.root / "fz" / "v1" / "images").rglob("*.png"))
        data = png.read_bytes()
        (f / "image.png").write_bytes(data)
        (f / "truncated.png").write_bytes(data[: len(data) // 3])
        (f / "garbage.png").write_bytes(os.urandom(512))
        (f / "empty.yaml").write_text("")
        (f / "notes.txt").write_text("8mm solid nodule, right upper lobe\n")
        (f / "dir.yaml").mkdir()
        (f / "ｆｕｌｌ.yaml").write_text(FZ_SPEC.replace("name: fz", "name: full"))
        (f / "with space.yaml").write_text(FZ_SPEC.replace("name: fz", "name: spaced"))
        (f / "volume_4096.yaml").write_text("name: big\ndomain: chest_ct_volume\nsamples: 1\n"
                                            "volume: {size: [4096, 4096, 4096]}\nfindings: {negatives: 1}\n")
        (f / "volume_1024.yaml").write_text("name: big\ndomain: chest_ct_volume\nsamples: 1\n"
                                            "volume: {size: [1024, 1024, 1024], spacing_mm: [0.3, 0.3, 0.3]}\n"
                                            "findings: {negatives: 1}\n")
        from bench.fuzz_targets import hostile_specs

        for name, (text, _) in hostile_specs().items():
            if len(text) < 100_000 and "\x00" not in text:
                (f / ("hostile_" + name.replace(" ", "_").replace("/", "_") + ".yaml")).write_text(text)

    def hostile_files(self) -> list[str]:
        return sorted(str(p) for p in self.files.iterdir())

    def snapshot_outside(self) -> list[str]:
        """What lies in the sandbox's parent folder outside the sandbox (must not change)."""
        out = []
        for dirpath, dirnames, filenames in os.walk(self.base):
            if Path(dirpath) == self.base:
                dirnames[:] = [d for d in dirnames if d != "sb"]
            out += [os.path.join(dirpath, n) for n in filenames + dirnames]
        return sorted(out)


# ------------------------------------------------------------------------------------------------ write watch
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.mkdir": (0,), "os.rename": (0, 1), "os.replace": (0, 1), "os.remove": (0,), "os.rmdir": (0,),
                "shutil.rmtree": (0,), "os.symlink": (1,), "os.link": (1,), "os.truncate": (0,), "os.chmod": (0,),
                "shutil.copyfile": (1,), "shutil.copytree": (1,), "shutil.move": (0, 1), "os.chown": (0,)}
_watch: dict[str, Any] = {"armed": False, "allowed": (), "violations": None}


def _hook(event: str, args: tuple) -> None:
    if not _watch["armed"]:
        return
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS)
        paths = [path] if writing else []
    elif event in _PATH_EVENTS:
        paths = [args[i] for i in _PATH_EVENTS[event] if i < len(args)]
    else:
        return
    for p in paths:
        if isinstance(p, int) or p is None:
            continue
        try:
            a = os.path.abspath(os.fsdecode(p))
        except (TypeError, ValueError):
            continue
        if "/__pycache__/" in a or a in ("/dev/null", "/dev/tty") or a.startswith(_watch["allowed"]):
            continue
        _watch["violations"].append(f"{event} {a}")
        _watch["armed"] = False  # do not recurse while refusing
        try:
            raise PermissionError(f"fuzz sandbox: {event} outside the sandbox refused: {a}")
        finally:
            _watch["armed"] = True


_hook_installed = False


@contextmanager
def watching_writes(sandbox: Sandbox):
    global _hook_installed
    if not _hook_installed:
        sys.addaudithook(_hook)
        _hook_installed = True
    allowed = [str(sandbox.sb) + os.sep]
    if os.environ.get("PREFECT_HOME"):
        allowed.append(os.path.abspath(os.environ["PREFECT_HOME"]) + os.sep)
    _watch.update(armed=False, allowed=tuple(allowed), violations=sandbox.violations)
    yield


@contextmanager
def armed():
    """Watch writes while one command runs (not while hypothesis itself keeps its files)."""
    _watch["armed"] = True
    try:
        yield
    finally:
        _watch["armed"] = False


@contextmanager
def no_orchestration():
    """Commands stop where Prefect would start (see the module docstring)."""
    from flows import settings

    def refuse(*a, **k):
        raise ReachedOrchestration()

    old = settings.prefect_api
    settings.prefect_api = refuse
    try:
        yield
    finally:
        settings.prefect_api = old


@contextmanager
def fuzz_session():
    """Sandbox entered, fz@v1 published, writes watched, orchestration stubbed; yields the sandbox."""
    sb = Sandbox()
    sb.enter()
    try:
        sb.populate()
        before = sb.snapshot_outside()
        with no_orchestration(), watching_writes(sb):
            yield sb
        after = sb.snapshot_outside()
        if after != before:
            sb.violations.append(f"files appeared outside the sandbox: {sorted(set(after) - set(before))[:5]}")
    finally:
        sb.leave()
        sb.remove()


# ------------------------------------------------------------------------------------------------ running one input
class _Capture(io.StringIO):
    def isatty(self) -> bool:
        return False


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``pairforge ARGV`` run in this process."""
    from flows.cli import run

    out, err = _Capture(), _Capture()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(list(argv))
    return code, out.getvalue(), err.getvalue()


def check_ending(argv: list[str], code: int, stdout: str, stderr: str) -> str:
    """'ok', 'refused' or 'verdict'; raises Defect for any other ending."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if "--verbose" in argv or "-v" in argv:  # asked for details and tracebacks: the last line is the verdict
        if code in (0, 1 if argv[:1] == ["verify"] else 0) or (code == 2 and lines and lines[-1].startswith("error:")):
            return "ok" if code == 0 else "refused" if code == 2 else "verdict"
        raise Defect(f"exit {code} (verbose) for {argv!r:.300}: {stderr[-300:]!r}")
    if "Traceback (most recent call last)" in stderr:
        raise Defect(f"traceback for {argv!r:.300}: {stderr[-300:]}")
    if code == 0:
        return "ok"
    if code == 2:
        if len(lines) != 1:
            raise Defect(f"exit 2 with {len(lines)} stderr lines for {argv!r:.300}: {stderr[:300]!r}")
        return "refused"
    if code == 1 and argv[:1] == ["verify"] and not lines:
        return "verdict"
    raise Defect(f"exit {code} for {argv!r:.300}: {stderr[:300]!r}")


def run_cli_target(sandbox: Sandbox, argv: list[str]) -> str:
    """One fuzz input: 'ok', 'refused', 'verdict' (verify's exit 1) or 'orchestration'; Defect otherwise."""
    n_viol = len(sandbox.violations)
    try:
        with time_limit(HANG_S), armed():
            code, out, err = run_cli(argv)
    except ReachedOrchestration:
        result = "orchestration"
    except Defect:
        raise
    except BaseException as e:  # noqa: BLE001 - anything escaping the command line is a defect
        raise Defect(f"{type(e).__name__}: {str(e)[:300]} escaped for {argv!r:.300}") from e
    else:
        result = check_ending(argv, code, out, err)
    finally:
        os.chdir(sandbox.cwd)  # a command must not move the process; put it back so inputs stay independent
    if len(sandbox.violations) > n_viol:
        new = sandbox.violations[n_viol:]
        del sandbox.violations[n_viol:]
        named = _named_paths(argv)
        stray = [v for v in new if not any(_within(v.split(" ", 1)[1], p) for p in named)]
        sandbox.directed += len(new) - len(stray)
        if stray:
            sandbox.violations += stray
            raise Defect(f"write outside the sandbox for {argv!r:.300}: {stray[:3]}")
    return result


def _within(written: str, named: str) -> bool:
    """``written`` is the named path, under it, or one of its parent folders (made on the way to it)."""
    return written == named or written.startswith(named.rstrip("/") + "/") or named.startswith(written.rstrip("/") + "/")


def _named_paths(argv: list[str]) -> list[str]:
    """Absolute paths the arguments name (a write there, refused by the watch, is one the user asked for)."""
    out = []
    for tok in argv:
        for t in (tok, tok.partition("=")[2]):
            t = t[len("file://"):] if t.startswith("file://") else t
            if t and "://" not in t:
                try:
                    out.append(os.path.abspath(os.path.expanduser(t)))
                except (ValueError, OSError):
                    pass
    return out


# ------------------------------------------------------------------------------------------------ strategies
def commands() -> dict[str, Any]:
    """Subcommand name -> its Click command (what `pairforge --help` lists)."""
    import typer

    from flows.cli import app

    return dict(sorted(typer.main.get_command(app).commands.items()))


NUMBERS = ["0", "1", "2", "-1", "3", "4097", "1e400", "nan", "NaN", "inf", "-inf", "9" * 40, "0x10", "1_000", "１",
           "٣", "abc", "", " 3", "2.5", "-0", "+5", "10000000000"]
REFS = ["fz@v1", "fz", "fz@latest", "fz@v0", "fz@v-1", "fz@vabc", "fz@v2", "fz@v1.0", "fz@v" + "9" * 30, "FZ@v1",
        "ｆｚ@v1", "fz@v１", "fѕ@v1", "../fz@v1", "../../etc@v1", "/etc/passwd@v1", "fz@@v1", "@v1", "fz@", "",
        "fz@V1", "nope@v1", "fz@v1 ", " fz@v1", "fz/../fz@v1", ".fz@v1", "fz@v01", "fz@v1@v1"]
PATHS = ["../x", "../../x", "../../../../x", "a/../../b", "/proc/self/nope/x", "/dev/null", "/dev/null/x",
         "/etc/passwd", "/", "", ".", "..", "~", "~/x", "missing.yaml", "missing/deeper/x", "memory://fz-root",
         "file:///proc/nope", "http://127.0.0.1:9/x", "out", "out/sub", "-", "--", "con", "x" * 300, "nul\u202ename",
         "ｏｕｔ", "оut"]
WORDS = ["local", "threads", "processes", "dask", "ray", "LOCAL", "cpu", "cuda", "auto", "mvtec", "nnunet", "coco",
         "monai", "hf", "croissant", "yolo", "dicom", "nope", "train", "val", "test", "train,val", "solid",
         "part_solid", "ground_glass", "class_name=plate", "=x", "k=", "x", "10,50,200", "a,b", "1,,2", "standin",
         "standin:3", "standin:-1", "tcp://127.0.0.1:1", "8mm solid nodule, right upper lobe",
         "2 mm scratch on brushed aluminium, top-left", "left middle lobe nodule 5 mm", "ѕolid"]
_SAFE_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)


def values(sandbox: Sandbox) -> st.SearchStrategy[str]:
    files = sandbox.hostile_files()
    rel = [os.path.relpath(p, sandbox.cwd) for p in files]
    return st.one_of(st.sampled_from(files + rel), st.sampled_from(REFS), st.sampled_from(PATHS),
                     st.sampled_from(NUMBERS), st.sampled_from(WORDS), _SAFE_TEXT,
                     st.sampled_from([str(sandbox.root), os.path.relpath(sandbox.root, sandbox.cwd)]))


_KIND = {"ref": REFS, "target": REFS, "against": REFS, "train_ref": REFS, "n": NUMBERS, "seed": NUMBERS,
         "workers": NUMBERS, "steps": NUMBERS, "limit": NUMBERS, "seeds": NUMBERS, "n_synthetic": NUMBERS,
         "runner": WORDS, "device": WORDS, "fmt": WORDS, "split": WORDS, "classes": WORDS, "option": WORDS,
         "ks": WORDS, "text": WORDS, "dask_address": WORDS, "class_name": WORDS, "real": WORDS}


def value_for(param: Any, sandbox: Sandbox, general: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    name = param.name or ""
    if name == "root":
        specific = st.sampled_from([str(sandbox.root), os.path.relpath(sandbox.root, sandbox.cwd), "../x",
                                    "/proc/nope", "memory://fz", "", "missing-root"])
    elif name in _KIND:
        specific = st.sampled_from(_KIND[name])
    else:  # files and folders: spec, source, dest, out_dir, features, set_to, specs
        files = sandbox.hostile_files()
        specific = st.sampled_from(files + [os.path.relpath(p, sandbox.cwd) for p in files] + PATHS)
    return st.one_of(specific, specific, general)


def argv_strategy(name: str, sandbox: Sandbox) -> st.SearchStrategy[list[str]]:
    cmd = commands()[name]
    general = values(sandbox)
    positionals = [p for p in cmd.params if p.param_type_name == "argument"]
    options = [p for p in cmd.params if p.param_type_name == "option" and p.name != "help"]
    all_flags = sorted({o for c in commands().values() for p in c.params if p.param_type_name == "option"
                        for o in list(p.opts) + list(p.secondary_opts)})
    # Strategies built once (hypothesis pays per strategy object, not per draw).
    of = {id(p): value_for(p, sandbox, general) for p in positionals + options}
    flags_of = {id(p): st.sampled_from(list(p.opts) + list(p.secondary_opts)) for p in options}
    soup = st.lists(st.one_of(general, st.sampled_from(all_flags + ["--", "-", "--help"])), max_size=8)
    chosen = st.lists(st.sampled_from(options), max_size=4) if options else st.just([])
    extra = st.sampled_from(all_flags + ["--bogus", "-z", "--root=", "--verbose=1"])
    small = st.integers(0, 7)

    @st.composite
    def one(draw) -> list[str]:
        if draw(small) == 0:  # a random token soup
            return [name] + draw(soup)
        args = [draw(of[id(p)]) for p in positionals for _ in range(2 if p.nargs == -1 and draw(st.booleans()) else 1)]
        if args and draw(small) == 0:
            args = args[:-1]  # one missing
        opts: list[str] = []
        for p in draw(chosen):
            flag = draw(flags_of[id(p)])
            if p.is_flag:
                opts.append(flag)
            elif draw(small) == 0 and flag.startswith("--"):
                opts.append(f"{flag}={draw(of[id(p)])}")
            else:
                opts += [flag, draw(of[id(p)])]
        if draw(small) == 0:
            opts.append(draw(extra))
        tokens = draw(st.permutations(args + opts)) if draw(st.booleans()) else args + opts
        return [name] + list(tokens)

    return one()
