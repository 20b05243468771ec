"""Python's cyclic garbage collector, paused while a pairforge process imports its libraries.

Importing Prefect, its API server, pydantic models, numpy, pyarrow and matplotlib makes a few hundred thousand
objects that live as long as the process. With the collector on, each full collection during the imports walks all
of them again: measured on a 2-core VM (``gc.callbacks``), 0.59 s of the API server's 3.9 s of start-up CPU, 0.62 s of
the ``pairforge build`` process's 4.0 s, and 0.3 s of each pool worker's (its first collection after the fork walks
everything it inherited). None of those walks frees anything worth having: the objects are modules, classes and
schemas.

``imports()`` turns the collector off for a block of imports, then moves what exists into the permanent generation
(``gc.freeze()``, as the ``gc`` documentation recommends before ``fork``): later collections skip it, and forked
workers neither walk it nor copy its pages by touching it. The few cycles made while the collector was off stay
allocated (a few MB at most; collecting them would cost a full walk). Only processes pairforge owns use it: the
``pairforge`` command, its compute-pool workers and its local API server; a library caller's collector is never
touched.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator


def pause() -> bool:
    """Turn the collector off; True when it was on (pass it to ``resume``)."""
    was = gc.isenabled()
    gc.disable()
    return was


def resume(enable: bool = True) -> None:
    """Freeze every object that exists now (later collections skip them), then turn the collector on unless
    ``enable`` is False (it was off before ``pause``)."""
    gc.freeze()
    if enable:
        gc.enable()


@contextlib.contextmanager
def imports() -> Iterator[None]:
    """The collector off for the block; its objects frozen after it; on again if it was on before."""
    was = pause()
    try:
        yield
    finally:
        resume(was)
