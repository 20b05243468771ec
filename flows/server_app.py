"""The local API server's app (``uvicorn --factory flows.server_app:create_app``): Prefect's own ``create_app``,
after loading Prefect's collections except those that register no block types (``prefect_compat.
BLOCKLESS_COLLECTIONS``). Prefect's block auto-registration at start-up loads every collection to hash the block
registry; with pairforge's Dask and Ray extras installed that imported Dask's distributed and Ray into the server,
~0.7 s of CPU in every build that starts its own server. The block types registered are the same (those two
register none).

Its imports and start-up (migrations check, block registration) run with the garbage collector paused
(flows.gcpause): ~0.6 s of the server's ~4 s of start-up CPU was spent walking modules and schemas that live as
long as it does. The collector is on again, and those objects frozen, once the app's lifespan has started."""
from __future__ import annotations

import contextlib
import gc
from typing import Any, AsyncIterator


def create_app(*args: Any, **kwargs: Any) -> Any:
    import importlib

    from flows import gcpause
    from flows import prefect_compat as compat

    was = gcpause.pause()
    try:
        compat.load_collections_except()
        module, name = compat.PREFECT_APP_FACTORY.split(":")
        app = getattr(importlib.import_module(module), name)(*args, **kwargs)
    except BaseException:
        gcpause.resume(was)
        raise
    router = getattr(app, "router", None)
    started = getattr(router, "lifespan_context", None)
    if started is None:  # no lifespan to wait for
        gcpause.resume(was)
        return app

    @contextlib.asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        try:
            async with started(a) as state:
                gcpause.resume(was)
                yield state
        finally:
            if not gc.isenabled() and was:  # start-up failed before the resume
                gc.enable()

    router.lifespan_context = lifespan
    return app
