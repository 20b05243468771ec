"""Hostile command lines and oversized specs: every `pairforge` subcommand's arguments fuzzed in process (exit 0, or
exit 2 with one line on stderr; never a traceback, another exit code, a hang or a write outside the sandbox), a
subprocess sample proving the real exit codes and stderr, and memory refusal before anything is allocated.
``bench/bench_fuzz.py`` runs 10,000 inputs per subcommand; here a few dozen each."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from bench.fuzz_cli import argv_strategy, commands, fuzz_session, run_cli, run_cli_target

REPO = Path(__file__).resolve().parent.parent
PER_COMMAND = 30


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    tmp_path_factory.getbasetemp()  # fixed now: the session points TMPDIR into its sandbox, removed afterwards
    with fuzz_session() as sb:
        yield sb
    assert not sb.violations, sb.violations


def test_fuzzing_covers_every_subcommand_help_lists():
    names = set(commands())
    assert {"build", "ls", "show", "verify", "pull", "export", "evaluate", "train", "preview", "validate", "parse",
            "root", "schema", "serve"} <= names


@pytest.mark.parametrize("name", sorted(commands()))
def test_subcommand_arguments_end_in_exit_0_or_one_line_exit_2(sandbox, name):
    seen: Counter = Counter()

    @settings(max_examples=PER_COMMAND, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(argv_strategy(name, sandbox))
    def one(argv):
        seen[run_cli_target(sandbox, argv)] += 1  # raises Defect on any other ending

    one()
    assert sum(seen.values()) == PER_COMMAND and set(seen) <= {"ok", "refused", "verdict", "orchestration"}
    assert not sandbox.violations


def test_known_inputs_reach_where_they_should(sandbox):
    """The sandbox is real: a good ref shows, a bad one is refused for the right reason, usage errors are one line."""
    code, out, err = run_cli(["show", "fz@v1"])
    assert code == 0 and "fz@v1" in out, err
    for argv, words in ((["show", "fz@v0"], "versions start at v1"), (["show", "fz@v7"], "no published version 7"), (["show", "fz@v-1"], "not valid"),
                        (["show", "fz@vabc"], "not valid"), (["show", "../fz@v1"], "is not allowed"),
                        (["show"], "Missing argument"), (["show", "fz@v1", "--bogus"], "No such option"),
                        (["preview", "x", "-o", "d", "-n", "nan"], "-n"),
                        (["evaluate", "fz@v1", "--seeds", "10000000000"], "--seeds must be 1 to"),
                        (["build", str(sandbox.files / "volume_4096.yaml")], "8-1024"),
                        (["build", str(sandbox.files / "missing.yaml")], "missing.yaml")):
        code, out, err = run_cli(argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and words in lines[0], (argv, code, err)
    # "~name" of no such user: os.path leaves it as written, pathlib raised RuntimeError (found by the 10,000 run)
    assert run_cli_target(sandbox, ["root", "--set", "~\U000c8b5b\U000ccb0fB"]) in ("ok", "refused")
    assert run_cli_target(sandbox, ["verify", str(sandbox.files / "image.png")]) in ("ok", "verdict")
    assert run_cli_target(sandbox, ["build", str(sandbox.files / "fz.yaml")]) == "ok"  # up to date: no build
    assert run_cli_target(sandbox, ["build", str(sandbox.files / "fz.yaml"), "--force-new"]) == "orchestration"


SUBPROCESS_SAMPLE = [
    (["show"], 2), (["show", "fz@v-1"], 2), (["show", "fz@vabc"], 2), (["ls", "--root"], 2),
    (["verify", "../../etc@v1"], 2), (["pull", "fz@v0", "out"], 2), (["export", "nope", "fz@v1", "out"], 2),
    (["preview", "8mm solid nodule, RUL", "-o", "pv", "-n", "0"], 2), (["evaluate", "fz@v1", "--seeds", "-3"], 2),
    (["build", "volume_4096.yaml"], 2), (["build", "../x.yaml"], 2), (["parse", "ѕolid nodule 8 mm"], 2),
    (["show", "fz@v1"], 0), (["ls"], 0), (["--help"], 0), ([], 0),
]


def test_subprocess_sample_has_the_same_exit_codes_and_one_line(sandbox):
    """The real process (``pairforge`` = ``flows.cli.main``): the exit codes and stderr the in-process runs see."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PAIRFORGE_ROOT=str(sandbox.root))
    for argv, want in SUBPROCESS_SAMPLE:
        argv = [str(sandbox.files / a) if a.endswith(".yaml") and a != "../x.yaml" else a for a in argv]
        r = subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", *argv], cwd=sandbox.cwd,
                           env=env, capture_output=True, text=True, timeout=300)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == want, (argv, r.returncode, r.stderr[-500:])
        assert "Traceback" not in r.stderr, (argv, r.stderr[-500:])
        if want == 2:
            assert len(lines) == 1 and lines[0].startswith("error: "), (argv, r.stderr)
        code, _, err = run_cli(argv)
        assert code == want and (want != 2 or err.strip() == lines[0]), (argv, code, err)


# ------------------------------------------------------------------------------------------------ memory refusal
def _volume(size, samples=1, shard_size=100):
    from schemas.spec import validate_spec

    return validate_spec({"name": "v", "domain": "chest_ct_volume", "samples": samples, "shard_size": shard_size,
                          "volume": {"size": list(size)}, "findings": {"negatives": 1}})


def test_a_4096_cubed_volume_is_refused_in_one_line_quickly():
    from schemas.errors import SpecError
    from schemas.spec import load_spec_text

    t0 = time.perf_counter()
    with pytest.raises(SpecError) as e:
        load_spec_text("name: v\ndomain: chest_ct_volume\nsamples: 1\nvolume: {size: [4096, 4096, 4096]}\n"
                       "findings: {negatives: 1}\n")
    assert time.perf_counter() - t0 < 2.0
    msg = str(e.value)
    assert "\n" not in msg and "volume" in msg and "8-1024" in msg


def test_volumes_that_need_more_memory_than_available_are_refused_before_allocating():
    from schemas.errors import SpecError
    from schemas.memory import available_memory, check_memory

    gib = 2 ** 30
    check_memory(_volume((64, 256, 256)), available=1 * gib)  # 4.2 M voxels x 20 B = 84 MB: fits
    with pytest.raises(SpecError) as e:
        check_memory(_volume((1024, 1024, 1024)), available=16 * gib)
    msg = str(e.value)
    assert "\n" not in msg and "1024 x 1024 x 1024 voxels" in msg and "16.0 GiB is available" in msg
    assert "20.0 GiB" in msg  # 2^30 voxels x 20 bytes
    # a shard of 8 volumes keeps 7 finished ones (11 B/voxel) while the 8th is made; 4 workers hold 4 shards
    with pytest.raises(SpecError) as e:
        check_memory(_volume((512, 512, 512), samples=8, shard_size=8), workers=4, available=32 * gib)
    assert "8 sample(s) per shard x 4 workers" in str(e.value)
    check_memory(_volume((512, 512, 512), samples=8, shard_size=1), workers=1, available=32 * gib)
    have = available_memory()
    assert have is not None and have > 0
    # On this machine: 1024^3 volumes in shards of 8 need ~97 GiB per worker
    with pytest.raises(SpecError):
        check_memory(_volume((1024, 1024, 1024), samples=8, shard_size=8))


def test_build_and_preview_refuse_an_oversized_volume_in_one_line_before_generating(tmp_path):
    spec = tmp_path / "big.yaml"
    spec.write_text("name: big\ndomain: chest_ct_volume\nsamples: 8\nshard_size: 8\n"
                    "volume: {size: [1024, 1024, 1024], spacing_mm: [0.3, 0.3, 0.3]}\nfindings: {negatives: 1}\n")
    for argv in (["build", str(spec), "--root", str(tmp_path / "root")],
                 ["preview", str(spec), "-o", str(tmp_path / "pv"), "-n", "4"]):
        t0 = time.perf_counter()
        code, out, err = run_cli(argv)
        assert time.perf_counter() - t0 < 30
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "GiB" in lines[0] and "available" in lines[0], (argv, err)
    assert not (tmp_path / "root").exists() and not (tmp_path / "pv").exists()
