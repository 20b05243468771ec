"""The backend interface and registries.

A backend = a *layout* for the spec's domain (spec + request + rng -> label map, instance map, parameters) and a
*renderer* chosen by name (layout + rng -> image, parameters). Layouts are registered per domain, renderers per
name; each renderer says which domains it can draw. ``procedural`` is the default and needs nothing but a CPU.
Which module holds a domain's layout and renderers comes from its ``schemas.domain.Domain`` description
(``layout_module``, ``renderers``); they are imported the first time they are asked for.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from schemas.domain import all_domains, get_domain
from schemas.errors import SpecError
from schemas.sample import Layout, SampleRequest

LayoutFn = Callable[[Any, SampleRequest, np.random.Generator], Layout]

_LAYOUTS: dict[str, LayoutFn] = {}
_RENDERERS: dict[tuple[str, str], type["Renderer"]] = {}


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
    """Register a renderer class under its name for each domain it draws (one name may serve several domains).
    ``domains = ("*",)`` serves every domain whose description lists the renderer's name in ``renderers``."""
    for domain in cls.domains:
        _RENDERERS[(cls.name, domain)] = cls
    return cls


def _load(names: list[str]) -> None:
    for mod in names:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a real missing dependency inside the module, not an absent optional module
                from schemas.extras import EXTRA_OF_MODULE, missing_extra

                if (e.name or "").split(".")[0] in EXTRA_OF_MODULE:
                    raise missing_extra(f"{mod.rsplit('.', 1)[-1]} rendering", e.name) from None
                raise


def _renderer_modules() -> dict[str, list[str]]:
    """Renderer name -> the modules (of every domain's description) that register it."""
    out: dict[str, list[str]] = {}
    for d in all_domains():
        for name, mod in d.renderers.items():
            out.setdefault(name, [])
            if mod not in out[name]:
                out[name].append(mod)
    return out


def available_renderers() -> list[str]:
    return sorted({n for n, _ in _RENDERERS} | set(_renderer_modules()))


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


def get_backend(name: str | None, domain: str, options: dict[str, Any] | None = None) -> Backend:
    """The backend ``name`` (None: the domain's default renderer) for ``domain``; an unknown name or domain is a
    SpecError listing what is accepted."""
    if name is None:
        name = get_domain(domain).default_renderer
    d = get_domain(domain)  # SpecError listing the known domains
    if (name, domain) not in _RENDERERS:
        modules = _renderer_modules()
        if name not in modules and name not in {n for n, _ in _RENDERERS}:
            raise SpecError(f"unknown generator {name!r}; accepted: {', '.join(available_renderers())}")
        _load([d.renderers[name]] if name in d.renderers else modules.get(name, []))
    if domain not in _LAYOUTS and d.layout_module:
        _load([d.layout_module])
    if domain not in _LAYOUTS:
        raise SpecError(f"no layout for domain {domain!r}; its description names layout module "
                        f"{d.layout_module!r}, which registers none")
    cls = _RENDERERS.get((name, domain))
    if cls is None and name in d.renderers:
        cls = _RENDERERS.get((name, "*"))
    if cls is None:
        served = sorted(dom for n, dom in _RENDERERS if n == name and dom != "*")
        served += sorted(dd.name for dd in all_domains() if name in dd.renderers and (name, "*") in _RENDERERS)
        served = sorted(set(served))
        raise SpecError(f"generator {name!r} cannot render domain {domain!r}; it renders: {', '.join(served) or 'nothing here'}")
    return Backend(name=name, domain=domain, layout_fn=_LAYOUTS[domain], renderer=cls(domain, options))
