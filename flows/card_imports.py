"""Imported by the build process before a process pool forks its workers (``flows.build.SHARD_MODULES``):
matplotlib (Agg) and pyarrow's dataset layer, which the dataset card's plots need (``flows.card.warm_up``).

The plots are drawn at the end of a build by one of the pool's workers (the ``dataset card: plots`` task) while
the build process publishes the rest; imported there, matplotlib would cost ~0.8 s of CPU on the build's critical
path with the other core idle. Imported once before the fork, every worker has it.
"""
from __future__ import annotations

from flows.card import warm_up

warm_up(plots=True)
