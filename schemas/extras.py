"""Optional parts of pairforge and the install extra that brings each: a feature whose packages are missing says,
in one line, which extra to install (``pip install 'pairforge[diffusion]'``), instead of a bare ImportError.

The base install is what the default job needs (procedural renderer, embedded Prefect API, process pool).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from schemas.errors import SpecError

# top-level module -> the extra that installs it
EXTRA_OF_MODULE = {
    "torch": "diffusion", "torchvision": "diffusion", "diffusers": "diffusion", "transformers": "diffusion",
    "safetensors": "diffusion", "controlnet_aux": "diffusion", "monai": "monai", "dask": "dask",
    "distributed": "dask", "prefect_dask": "dask", "ray": "ray", "prefect_ray": "ray", "s3fs": "s3",
}


class MissingExtra(SpecError):
    """A feature was asked for whose optional packages are not installed."""


def missing_extra(feature: str, module: str, extra: str | None = None) -> MissingExtra:
    extra = extra or EXTRA_OF_MODULE.get(module.split(".")[0], "all")
    return MissingExtra(f"{feature} needs the '{extra}' extra ({module.split('.')[0]} is not installed): "
                        f"pip install 'pairforge[{extra}]'")


def import_extra(module: str, feature: str, extra: str | None = None) -> ModuleType:
    """``importlib.import_module(module)``, or MissingExtra naming the extra when it (or what it needs) is absent."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = (e.name or module).split(".")[0]
        if top in EXTRA_OF_MODULE or top == module.split(".")[0]:
            raise missing_extra(feature, e.name or module, extra) from None
        raise
