"""Build progress events travel through an EventChannel that task runners must be able to ship to worker
processes: cloudpickle of a lane task's arguments once failed with "cannot pickle '_contextvars.ContextVar'"."""
import pickle
import subprocess
import sys

import cloudpickle

from flows import build
from flows.progress import EventChannel


def test_channel_pickles_by_name_and_drops_events_without_a_reporter():
    ch = EventChannel("pf-test-channel")
    seen = []
    with ch.reporting_to(seen.append):
        again = pickle.loads(pickle.dumps(ch))
        assert again is ch  # same process: the same channel, the caller's reporter still set
        ch.emit("shard", index=1)
    assert seen == [{"event": "shard", "index": 1}]
    # In a fresh process (a worker) the channel exists by name and has no reporter: events are dropped.
    payload = cloudpickle.dumps(build._emit)
    code = ("import pickle,sys; f = pickle.loads(sys.stdin.buffer.read()); f('shard', index=2); "
            "print(type(f.__self__).__name__, f.__self__.name, f.__self__.get())")
    out = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, check=True)
    assert out.stdout.decode().split() == ["EventChannel", "pairforge_progress", "None"]
