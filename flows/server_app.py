"""The local API server's app (``uvicorn --factory flows.server_app:create_app``): Prefect's own ``create_app``,
after loading Prefect's collections except those that register no block types (``prefect_compat.
BLOCKLESS_COLLECTIONS``). Prefect's block auto-registration at start-up loads every collection to hash the block
registry; with pairforge's Dask and Ray extras installed that imported Dask's distributed and Ray into the server,
~0.7 s of CPU in every build that starts its own server. The block types registered are the same (those two
register none)."""
from __future__ import annotations

from typing import Any


def create_app(*args: Any, **kwargs: Any) -> Any:
    import importlib

    from flows import prefect_compat as compat

    compat.load_collections_except()
    module, name = compat.PREFECT_APP_FACTORY.split(":")
    return getattr(importlib.import_module(module), name)(*args, **kwargs)
