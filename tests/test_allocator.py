"""PAIRFORGE_MALLOC (flows/allocator.py): glibc's allocator is left alone unless ``heap`` asks for the settings;
any other value is one line naming what is accepted. Each case in a fresh interpreter (tune() runs once per
process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROBE = "import json; from flows import allocator; print(json.dumps(allocator.tune()))"


def _tune(value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PAIRFORGE_MALLOC"}
    env["PYTHONPATH"] = str(REPO)
    if value is not None:
        env["PAIRFORGE_MALLOC"] = value
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("value", [None, "", "default", " Default "])
def test_the_allocator_is_left_alone_by_default(value):
    r = _tune(value)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_heap_applies_the_settings_on_glibc():
    import platform

    r = _tune("heap")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) is (platform.libc_ver()[0] == "glibc")


def test_an_unknown_value_is_one_line_naming_what_is_accepted():
    from flows import allocator
    from schemas.errors import SpecError

    old = os.environ.get("PAIRFORGE_MALLOC")
    os.environ["PAIRFORGE_MALLOC"] = "tuned"
    try:
        with pytest.raises(SpecError, match=r"^PAIRFORGE_MALLOC='tuned'; accepted: default, heap \(default: leave "
                                            r"the allocator alone\)$"):
            allocator.requested()
    finally:
        if old is None:
            os.environ.pop("PAIRFORGE_MALLOC")
        else:
            os.environ["PAIRFORGE_MALLOC"] = old
