"""The local API server and Prefect's default SQLite database (flows/settings.py): a database a pairforge server was
creating when it was killed (a build stopped in its first seconds on a new machine) is made again by the next start,
and a database that fails to migrate for any other reason is one clear error, not a two-minute wait. Real servers."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest

from flows.settings import CREATING_SUFFIX, LocalServer


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _broken_database(path) -> None:
    """What a server killed half-way through Prefect's SQLite migrations leaves: some DDL committed, the migration
    not recorded, so every later migration fails with "... already exists"."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE block_document (id, block_type_name, name)")
    con.execute("CREATE INDEX ix_block_document__block_type_name_name ON block_document (block_type_name, name)")
    con.commit()
    con.close()


@pytest.fixture()
def home(tmp_path, monkeypatch):
    h = tmp_path / "prefect-home"
    h.mkdir()
    monkeypatch.setenv("PREFECT_HOME", str(h))
    for k in [k for k in __import__("os").environ if k.startswith("PREFECT_") and "DATABASE" in k]:
        monkeypatch.delenv(k)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    return h


def test_a_database_left_half_created_by_a_killed_server_is_created_again(home):
    db = home / "prefect.db"
    _broken_database(db)
    (home / ("prefect.db" + CREATING_SUFFIX)).write_text(f"{_dead_pid()} {_dead_pid()}\n")
    server = LocalServer(False, False, home / "local-server.log").start()
    try:
        url = server.wait(timeout=240)
        with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
            assert r.status == 200
    finally:
        server.stop()
    assert not (home / ("prefect.db" + CREATING_SUFFIX)).exists()  # complete now: left alone from here on
    tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"flow_run", "block_document", "alembic_version"} <= tables


def test_a_new_database_is_marked_until_its_server_first_answers(home):
    server = LocalServer(False, False, home / "local-server.log").start()
    try:
        assert (home / ("prefect.db" + CREATING_SUFFIX)).exists()
        server.wait(timeout=240)
        assert not (home / ("prefect.db" + CREATING_SUFFIX)).exists()
    finally:
        server.stop()
    # A database that exists and answered is never marked, so never removed, by later starts.
    again = LocalServer(False, False, home / "local-server.log").start()
    try:
        assert not (home / ("prefect.db" + CREATING_SUFFIX)).exists()
        again.wait(timeout=240)
    finally:
        again.stop()


def test_a_database_that_fails_to_migrate_is_one_error_naming_the_cause_and_the_log(home):
    _broken_database(home / "prefect.db")  # not marked: not pairforge's to remove
    server = LocalServer(False, False, home / "local-server.log").start()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        server.wait(timeout=240)
    assert time.monotonic() - t0 < 120  # no retry loop until the start-up timeout
    msg = str(e.value)
    assert "\n" not in msg and "exited with code 3 while starting" in msg and "OperationalError" in msg, msg
    assert str(home / "local-server.log") in msg and server.process is None
    assert (home / "prefect.db").exists()  # kept as it was
