"""Test isolation for Prefect: a private PREFECT_HOME, telemetry off, no user API, and one shared test server.

Set at import time, before any test module imports prefect (Prefect reads its settings on import).
The ``prefect_api`` fixture starts ``prefect_test_harness`` once per session, only when a test asks for it.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_PREFECT_HOME = tempfile.mkdtemp(prefix="pairforge-test-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_PROFILES_PATH"] = os.path.join(_PREFECT_HOME, "profiles.toml")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ["PREFECT_SERVER_LOGGING_LEVEL"] = "WARNING"
# Tests never report to the developer's own server or read their profile.
for _k in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE"):
    os.environ.pop(_k, None)
os.environ.pop("PAIRFORGE_ROOT", None)
# The default root and the user config live under these: tests never read or write the developer's own.
os.environ["XDG_CONFIG_HOME"] = os.path.join(_PREFECT_HOME, "xdg-config")
os.environ["XDG_DATA_HOME"] = os.path.join(_PREFECT_HOME, "xdg-data")


@pytest.fixture(scope="module")
def moto_s3(request):
    """fsspec options of moto's real S3 server, one per test module, with the module's ``MOTO_BUCKET`` created."""
    import bench.faults as faults

    with faults.moto_server(bucket=request.module.MOTO_BUCKET) as (_endpoint, opts):
        yield opts


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path):
    """(url, storage options) of an empty dataset root: a local folder, then a prefix in the module's moto bucket."""
    if request.param == "local":
        return str(tmp_path / "datasets"), None
    return f"s3://{request.module.MOTO_BUCKET}/{tmp_path.name}", request.getfixturevalue("moto_s3")


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (SQLite, subprocess server) shared by the whole session; yields its URL.

    The URL is also exported as PREFECT_API_URL so that subprocesses (the CLI under test, process pools, Dask
    workers) report to the same server instead of each starting an ephemeral one.
    """
    from flows import settings

    settings.silence_shutdown_noise()
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_API_URL.value()
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            os.environ.pop("PREFECT_API_URL", None)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


TINY_SPEC = """\
name: {name}
domain: chest_ct
samples: {samples}
seed: 3
image: {{size: 256, spacing_mm: [1.2, 1.4]}}
findings:
  negatives: 0.2
  mixture:
    - "8mm solid nodule, right upper lobe"
    - "2 solid nodules 6-9 mm, left lower lobe"
    - "12 mm GGN in the RLL"
shard_size: {shard_size}
schedule: "{schedule}"
"""


def tiny_spec_text(name: str = "tiny-ct", samples: int = 12, shard_size: int = 4, schedule: str = "0 3 * * *") -> str:
    """A small chest-CT spec (256 px: the smallest size whose watermark reads back reliably) that builds in seconds; several shards so resuming has something to reuse."""
    return TINY_SPEC.format(name=name, samples=samples, shard_size=shard_size, schedule=schedule)


@pytest.fixture(scope="session")
def tiny_spec_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("specs") / "tiny.yaml"
    p.write_text(tiny_spec_text())
    return p


@pytest.fixture(scope="session")
def published_tiny(prefect_api, tiny_spec_file, tmp_path_factory):
    """One build of the tiny spec with the default local runner, shared by the flow and CLI tests."""
    from flows.build import run_build

    root = tmp_path_factory.mktemp("root-published")
    summary = run_build(str(tiny_spec_file), root=str(root))
    return {"root": root, "summary": summary, "spec": tiny_spec_file}
