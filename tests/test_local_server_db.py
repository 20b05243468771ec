"""The local API server and Prefect's default SQLite database (flows/settings.py): a database a pairforge server was
creating when it was killed (a build stopped in its first seconds on a new machine) is made again by the next start,
and a database that fails to migrate for any other reason is one clear error, not a two-minute wait. Real servers,
each case in a fresh interpreter whose PREFECT_HOME is a temporary folder and whose database is Prefect's default
(the test session's own Prefect settings name another database)."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARKER = "prefect.db.pairforge-creating"

START = """
import json, sys, time, urllib.request
from flows.settings import CREATING_SUFFIX, LocalServer
from pathlib import Path
home = Path(sys.argv[1])
marker = home / ("prefect.db" + CREATING_SUFFIX)
out = {}
for k in range(int(sys.argv[2])):
    server = LocalServer(False, False, home / "local-server.log").start()
    out[f"marked_{k}"] = marker.exists()
    t0 = time.monotonic()
    try:
        url = server.wait(timeout=240)
        with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
            out[f"health_{k}"] = r.status
    except RuntimeError as e:
        out[f"error_{k}"] = str(e)
        out[f"process_{k}"] = server.process is not None
    finally:
        out[f"seconds_{k}"] = time.monotonic() - t0
        server.stop()
    out[f"marked_after_{k}"] = marker.exists()
print(json.dumps(out))
"""


def _starts(home: Path, n: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("PREFECT_") and ("DATABASE" in k or k in ("PREFECT_API_URL", "PREFECT_HOME")))}
    env.update(PREFECT_HOME=str(home), PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", START, str(home), str(n)], env=env, capture_output=True, text=True,
                       timeout=900, cwd=home)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _broken_database(path: Path) -> None:
    """What a server killed half-way through Prefect's SQLite migrations leaves: some DDL committed, the migration
    not recorded, so every later migration fails with "... already exists"."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE block_document (id, block_type_name, name)")
    con.execute("CREATE INDEX ix_block_document__block_type_name_name ON block_document (block_type_name, name)")
    con.commit()
    con.close()


def test_a_database_left_half_created_by_a_killed_server_is_created_again(tmp_path):
    _broken_database(tmp_path / "prefect.db")
    (tmp_path / MARKER).write_text(f"{_dead_pid()} {_dead_pid()}\n")
    out = _starts(tmp_path)
    assert out.get("health_0") == 200, out
    assert out["marked_after_0"] is False  # complete now: left alone from here on
    tables = {r[0] for r in sqlite3.connect(tmp_path / "prefect.db").execute(
        "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"flow_run", "block_document", "alembic_version"} <= tables


def test_a_new_database_is_marked_until_its_server_first_answers(tmp_path):
    out = _starts(tmp_path, 2)
    assert out["health_0"] == 200 and out["health_1"] == 200, out
    assert out["marked_0"] is True and out["marked_after_0"] is False
    assert out["marked_1"] is False  # a database that answered is never marked, so never removed, by later starts


def test_a_database_that_fails_to_migrate_is_one_error_naming_the_cause_and_the_log(tmp_path):
    _broken_database(tmp_path / "prefect.db")  # not marked: not pairforge's to remove
    out = _starts(tmp_path)
    msg = out.get("error_0", "")
    assert msg and out["seconds_0"] < 120, out  # no retry loop until the start-up timeout
    assert "\n" not in msg and "exited with code 3 while starting" in msg and "OperationalError" in msg, msg
    assert str(tmp_path / "local-server.log") in msg and out["process_0"] is False
    assert (tmp_path / "prefect.db").exists()  # kept as it was
