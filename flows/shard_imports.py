"""Imported by the build process before a process pool forks its workers (``flows.build.SHARD_MODULES``): what a
shard's first write would otherwise import in every worker.

pyarrow converts Python lists (``pa.Table.from_pylist`` in ``BuildStaging.write_shard``) through a check that
imports pandas on first use, only to ask whether the input is a pandas object: ~0.4 s of CPU per process. Made
once here, before the fork, every forked worker inherits the answer (with or without pandas installed).
"""
from __future__ import annotations

import pyarrow as pa

pa.array([0])
