"""The embedded default, end to end as a user runs it: no PREFECT_API_URL, so ``pairforge build`` and
``pairforge serve`` start their own local Prefect API (Prefect's server, SQLite under PREFECT_HOME).

* a build publishes and leaves no server process behind, also when it is SIGKILLed mid-run;
* ``pairforge serve`` with a ``schedule:`` cron: the cron fires, the scheduled run builds and publishes a version.

Each test starts real processes (server, CLI, worker pools); they share one PREFECT_HOME so the database is migrated
once.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import tiny_spec_text

REPO = Path(__file__).resolve().parent.parent
PAIRFORGE = [sys.executable, "-c", "import sys; from flows.cli import main; sys.argv[0] = 'pairforge'; main()"]


@pytest.fixture(scope="module")
def embedded_env(tmp_path_factory):
    """The environment of a user with no Prefect server: no PREFECT_API_URL, a PREFECT_HOME of its own."""
    home = tmp_path_factory.mktemp("embedded-prefect-home")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_PROFILES_PATH=str(home / "profiles.toml"), PYTHONPATH=str(REPO))
    return env


def _servers_of(home: str) -> list[psutil.Process]:
    """Prefect API server processes whose PREFECT_HOME is ``home`` (started by the command under test)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if "prefect.server.api.server:create_app" in cmd and p.environ().get("PREFECT_HOME") == home:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


def test_embedded_build_publishes_and_stops_its_server(embedded_env, tmp_path):
    spec = tmp_path / "embedded.yaml"
    spec.write_text(tiny_spec_text(name="embedded-ct", samples=8, shard_size=4))
    r = subprocess.run(PAIRFORGE + ["build", str(spec), "--root", str(tmp_path / "root")], cwd=REPO,
                       env=embedded_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "shards: 2 generated, 0 reused (of 2)" in r.stdout
    assert (tmp_path / "root" / "embedded-ct" / "v1" / "manifest.json").is_file()
    assert (tmp_path / "root" / "embedded-ct" / "v1" / "card" / "sample_grid.png").is_file()
    assert _wait_gone(_servers_of(embedded_env["PREFECT_HOME"]), 10) == []


def test_bad_input_stops_the_server_launched_at_the_start_and_publishes_nothing(embedded_env, tmp_path):
    """The build launches its local API server before the input checks (start-up overlaps them): a spec that fails
    them, or a version that is already up to date, must still leave no server behind."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(tiny_spec_text(name="bad-ct", samples=-3, shard_size=4))
    r = subprocess.run(PAIRFORGE + ["build", str(bad), "--root", str(tmp_path / "root")], cwd=REPO,
                       env=embedded_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "samples" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "root" / "bad-ct").exists()
    assert _wait_gone(_servers_of(embedded_env["PREFECT_HOME"]), 10) == []


LOOPBACK_PROBE = """
import os, ssl
from flows import settings
with settings.prefect_api():
    from prefect import get_client
    from prefect.settings import PREFECT_API_SSL_CERT_FILE
    ca = PREFECT_API_SSL_CERT_FILE.value()
    with get_client(sync_client=True) as c:
        ok = c.api_healthcheck() is None
    n = open(ca).read().count("BEGIN CERTIFICATE")
    ssl.create_default_context(cafile=ca)  # a CA file TLS accepts
print(ok, n, ca, os.environ.get("PREFECT_API_SSL_CERT_FILE"))
"""


def test_clients_of_the_local_server_load_a_one_certificate_ca_file_and_a_users_own_is_kept(embedded_env, tmp_path):
    """The local server is plain HTTP on 127.0.0.1, yet Prefect's client loads its whole CA bundle for every client it
    creates (~35 ms each): pairforge points it at a file of one certificate while that server runs, and removes
    the setting after; a CA file the user set is left alone."""
    r = subprocess.run([sys.executable, "-c", LOOPBACK_PROBE], cwd=REPO, env=embedded_env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ok, n, ca, after = r.stdout.split()
    assert (ok, n, after) == ("True", "1", "None") and ca == str(Path(embedded_env["PREFECT_HOME"]) /
                                                               "pairforge-loopback-ca.pem")
    import certifi

    own = tmp_path / "own-ca.pem"
    own.write_text(Path(certifi.where()).read_text())
    r = subprocess.run([sys.executable, "-c", LOOPBACK_PROBE], cwd=REPO, capture_output=True, text=True,
                       env={**embedded_env, "PREFECT_API_SSL_CERT_FILE": str(own)}, timeout=300)
    assert r.returncode == 0, r.stderr
    ok, n, ca, after = r.stdout.split()
    assert ok == "True" and int(n) > 100 and ca == after == str(own)


def test_sigkilled_embedded_build_leaves_no_processes_behind(embedded_env, tmp_path):
    """SIGKILL gives the CLI no chance to clean up: its server and worker processes must still go."""
    spec = tmp_path / "killed.yaml"
    spec.write_text(tiny_spec_text(name="killed-ct", samples=48, shard_size=4))
    proc = subprocess.Popen(PAIRFORGE + ["build", str(spec), "--root", str(tmp_path / "root")], cwd=REPO,
                            env=embedded_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cli = psutil.Process(proc.pid)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if list((tmp_path / "root").glob("killed-ct/_staging/*/parts/shard-*.done.json")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build ended before it could be killed"
    children = cli.children(recursive=True)
    assert any("create_app" in " ".join(c.cmdline()) for c in children), "no local API server was started"
    proc.send_signal(signal.SIGKILL)  # the CLI alone: its children are not signalled
    proc.wait(timeout=30)
    alive = _wait_gone(children, 30)
    assert alive == [], [" ".join(p.cmdline())[:120] for p in alive]


def test_served_cron_schedule_fires_and_publishes(embedded_env, tmp_path):
    """``pairforge serve`` on a spec whose cron is every minute: within about a minute the scheduler creates a run,
    the served deployment picks it up and the run publishes v1 of the dataset."""
    spec = tmp_path / "cron.yaml"
    spec.write_text(tiny_spec_text(name="cron-ct", samples=4, shard_size=4, schedule="* * * * *"))
    root = tmp_path / "root"
    env = dict(embedded_env, PREFECT_RUNNER_POLL_FREQUENCY="2", PREFECT_API_SERVICES_SCHEDULER_LOOP_SECONDS="2")
    proc = subprocess.Popen(PAIRFORGE + ["serve", str(spec), "--root", str(root), "--runner", "threads"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    manifest = root / "cron-ct" / "v1" / "manifest.json"
    try:
        deadline = time.monotonic() + 240  # the next minute boundary, then a run of a few seconds
        while time.monotonic() < deadline and proc.poll() is None and not manifest.is_file():
            time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()
        assert manifest.is_file(), "the cron did not fire a run that published within 4 minutes"
    finally:
        servers = _servers_of(env["PREFECT_HOME"])
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert "deployment cron-ct: cron-ct on cron '* * * * *'" in out, out
    assert _wait_gone(servers, 15) == []
