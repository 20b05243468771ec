"""The backend interface and registries.

A backend = a *layout* for the spec's domain (spec + request + rng -> label map, instance map, parameters) and a
*renderer* chosen by name (layout + rng -> image, parameters). Layouts are registered per domain, renderers per
name; each renderer says which domains it can draw. ``procedural`` is the default and needs nothing but a CPU.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from schemas.errors import SpecError
from schemas.sample import Layout, SampleRequest

LayoutFn = Callable[[Any, SampleRequest, np.random.Generator], Layout]

_LAYOUTS: dict[str, LayoutFn] = {}
_RENDERERS: dict[tuple[str, str], type["Renderer"]] = {}
# Modules imported lazily the first time a registry is read, so heavy backends (torch) load only when asked for.
_BUILTIN_MODULES = {"layouts": ["generators.chest_ct", "generators.surface"]}
_RENDERER_MODULES = {"procedural": ["generators.ct_render", "generators.surface"], "controlnet": ["generators.controlnet"]}


class Renderer:
    """Turns layouts into images. Subclasses set ``name``, ``version`` and ``domains`` and implement ``render``."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "0"
    domains: ClassVar[tuple[str, ...]] = ()
    options_accepted: ClassVar[tuple[str, ...]] = ()

    def __init__(self, domain: str, options: dict[str, Any] | None = None):
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.options_accepted))
        if unknown:
            accepted = ", ".join(self.options_accepted) or "none"
            raise SpecError(f"unknown option(s) {', '.join(unknown)} for generator {self.name!r}; accepted: {accepted}")
        self.domain = domain
        self.options = options

    def check_spec(self, spec: Any) -> None:
        """Refuse, before anything is generated, what this renderer cannot do for ``spec`` (e.g. an image size).
        Called by the pipeline right after the backend is built."""

    def render(self, layout: Layout, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        raise NotImplementedError

    def render_batch(self, layouts: list[Layout], rngs: list[np.random.Generator]) -> list[tuple[np.ndarray, dict]]:
        """Render several layouts; GPU backends override this to batch. Each sample uses only its own rng."""
        return [self.render(lay, rng) for lay, rng in zip(layouts, rngs)]


def register_layout(domain: str) -> Callable[[LayoutFn], LayoutFn]:
    def deco(fn: LayoutFn) -> LayoutFn:
        _LAYOUTS[domain] = fn
        return fn
    return deco


def register_renderer(cls: type[Renderer]) -> type[Renderer]:
    """Register a renderer class under its name for each domain it draws (one name may serve several domains)."""
    for domain in cls.domains:
        _RENDERERS[(cls.name, domain)] = cls
    return cls


def _load(kind: str, names: list[str] | None = None) -> None:
    for mod in names if names is not None else _BUILTIN_MODULES[kind]:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a real missing dependency inside the module, not an absent optional module
                from schemas.extras import EXTRA_OF_MODULE, missing_extra

                if (e.name or "").split(".")[0] in EXTRA_OF_MODULE:
                    raise missing_extra(f"{mod.rsplit('.', 1)[-1]} rendering", e.name) from None
                raise


def available_renderers() -> list[str]:
    return sorted({n for n, _ in _RENDERERS} | set(_RENDERER_MODULES))


@dataclass
class Backend:
    name: str
    domain: str
    layout_fn: LayoutFn
    renderer: Renderer

    @property
    def version(self) -> str:
        return self.renderer.version

    def layout(self, spec: Any, request: SampleRequest, rng: np.random.Generator) -> Layout:
        return self.layout_fn(spec, request, rng)

    def render(self, layout: Layout, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        return self.renderer.render(layout, rng)


def get_backend(name: str, domain: str, options: dict[str, Any] | None = None) -> Backend:
    """The backend ``name`` for ``domain``; an unknown name or domain is a SpecError listing what is accepted."""
    if (name, domain) not in _RENDERERS:
        if name not in _RENDERER_MODULES and name not in {n for n, _ in _RENDERERS}:
            raise SpecError(f"unknown generator {name!r}; accepted: {', '.join(available_renderers())}")
        _load("renderers", _RENDERER_MODULES.get(name, []))
    if domain not in _LAYOUTS:
        _load("layouts")
    if domain not in _LAYOUTS:
        raise SpecError(f"no layout for domain {domain!r}; known domains: {', '.join(sorted(_LAYOUTS))}")
    cls = _RENDERERS.get((name, domain))
    if cls is None:
        served = sorted(d for n, d in _RENDERERS if n == name)
        raise SpecError(f"generator {name!r} cannot render domain {domain!r}; it renders: {', '.join(served) or 'nothing here'}")
    return Backend(name=name, domain=domain, layout_fn=_LAYOUTS[domain], renderer=cls(domain, options))
