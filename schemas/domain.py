"""Domains as plug-ins: one ``Domain`` description per domain, registered by name.

A domain is what a spec's ``domain:`` field names: chest-CT slices, surface defects, or a third one a package
adds. Its description holds the schema-level parts (spec model, class table, shorthand parser, planner hooks,
image codec name, control-map and prompt hooks, display window) and the *names* of the modules that hold its
parts in the other layers (layout in ``generators/``, annotator in ``annotators/``, renderers, preview and card
hooks), imported lazily by those layers' registries. Shared code looks a domain up here; it never compares a
domain name.

Registering a domain::

    from schemas.domain import Domain, register_domain
    register_domain(Domain(name="weld_xray", spec_model=WeldSpec, classes=WELD_CLASSES, codec="u8",
                           plan_frame=frame, plan_finding=finding, parse_finding=parse_weld,
                           layout_module="generators.weld_xray", annotator_module="annotators.weld_xray",
                           renderers={"procedural": "generators.weld_xray"}))

Where domains come from, in this order (once, on the first look-up):
- the built-in modules in ``BUILTIN_DOMAIN_MODULES``;
- the ``pairforge.domains`` entry-point group of installed packages (each entry point is a module to import or a
  callable to call);
- the modules named in ``$PAIRFORGE_PLUGINS`` (comma-separated), e.g. ``PAIRFORGE_PLUGINS=tests.toy_domain``;
  a module that defines ``register()`` has it called.
A test (or any code) can also call ``register_domain`` at any time.
"""
from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from schemas.errors import SpecError

# Built-in domains: the schema module of each registers its Domain on import.
BUILTIN_DOMAIN_MODULES: tuple[str, ...] = ("schemas.chest_ct", "schemas.surface", "schemas.chest_ct_volume")
ENTRY_POINT_GROUP = "pairforge.domains"
PLUGINS_ENV = "PAIRFORGE_PLUGINS"


@dataclass(frozen=True)
class Domain:
    """Everything pairforge needs to know about one domain. Layer parts are module names, imported on demand.

    Planner hooks (the shared planner in ``schemas.plan`` draws the split, the negative share, the mixture entry
    by weight and ``count`` repeats; the domain supplies only what is its own):
    - ``plan_frame(spec, rng) -> (spacing_mm, (height, width), params)``: the per-sample frame (spacing, level,
      material...), drawn right after the split;
    - ``plan_finding(spec, entry, k, rng) -> dict``: one concrete finding from mixture entry ``k``.
    The spec's mixture is ``getattr(spec, findings_field)`` with ``.negatives`` and ``.mixture`` (entries have
    ``.weight`` and ``.count``).
    """

    name: str
    spec_model: type  # a schemas.spec.BaseSpec subclass whose ``domain`` field is Literal[name]
    classes: Any  # schemas.classes.ClassTable
    plan_frame: Callable[[Any, Any], tuple[float, tuple[int, int], dict]]
    plan_finding: Callable[[Any, Any, int, Any], dict]
    # Real sources (spec ``source:``): per-sample choice of the source by index, merged into the request params
    # (e.g. {"source_unit": 3, "group": "src-..."}); None for domains without sources.
    plan_source: Callable[[Any, int], dict] | None = None
    codec: str = "u8"  # image codec name (store.codec registry)
    codec_params: dict[str, Any] = field(default_factory=dict)
    codec_module: str | None = None  # module that registers the codec, if it is not a built-in one
    findings_field: str = "findings"
    # Shorthand: text -> {"finding": dict, **extras}; claims(text) says whether a text is this domain's.
    parse_finding: Callable[[str], dict] | None = None
    claims_text: Callable[[str], bool] | None = None
    # A small all-positive spec mapping around one parsed finding (for `pairforge preview "text"`).
    one_finding_spec: Callable[[dict, int, int], dict] | None = None
    # Layer parts, by module name (imported lazily by generators/annotators/flows).
    layout_module: str | None = None
    annotator_module: str | None = None
    renderers: dict[str, str] = field(default_factory=dict)  # renderer name -> module that registers it
    default_renderer: str = "procedural"
    hooks_module: str | None = None  # flows-level hooks: preview_overlay(...), card hooks; optional
    # Display: (centre, width) window for float images shown to people (cards, previews); None = min..max.
    display_window: tuple[float, float] | None = None
    outline_classes: tuple[int, ...] | None = None  # classes outlined on thumbnails; None = all
    # Control maps and prompts (generators.controlnet): module with the domain's ControlNet hooks.
    controlnet_module: str | None = None
    # Evaluation (``pairforge evaluate``): the module that registers the domain's evaluation profile on import
    # (reference value ranges per class, finding / surrounding / uniform-tissue classes, segmenter classes,
    # windows; see ``annotators.evaluation.EvalProfile``), and built-in reference sets that ``--real NAME[:N]``
    # names: NAME -> "module:function", function(n, size=, seed=) -> list of sample dicts (image, label,
    # instance, spacing_mm, sample_id), with an optional ``note`` attribute saying what the set is.
    evaluation_module: str | None = None
    reference_sets: dict[str, str] = field(default_factory=dict)
    default: bool = False  # the domain of a spec that names none
    description: str = ""

    @property
    def schema_module(self) -> str:
        return self.spec_model.__module__


_DOMAINS: dict[str, Domain] = {}
_lock = threading.RLock()
_loaded = False
_loading = False


def register_domain(domain: Domain, replace: bool = True) -> Domain:
    """Register (or, with ``replace``, re-register) a domain under its name; returns it."""
    if not domain.name or not domain.name.replace("_", "").isalnum() or domain.name != domain.name.lower():
        raise ValueError(f"domain name {domain.name!r} must be lowercase letters, digits and '_'")
    with _lock:
        if domain.name in _DOMAINS and not replace:
            raise ValueError(f"domain {domain.name!r} is already registered")
        _DOMAINS[domain.name] = domain
    return domain


def unregister_domain(name: str) -> None:
    with _lock:
        _DOMAINS.pop(name, None)


def _import_plugin(modname: str) -> None:
    mod = importlib.import_module(modname)
    reg = getattr(mod, "register", None)
    if callable(reg):
        reg()


def load_plugins(reload: bool = False) -> None:
    """Import the built-in domains, entry points and $PAIRFORGE_PLUGINS once (idempotent, thread-safe);
    ``reload`` reads them again (e.g. after $PAIRFORGE_PLUGINS changed)."""
    global _loaded, _loading
    if reload:
        with _lock:
            _loaded = False
    if _loaded:
        return
    with _lock:  # re-entrant: a module imported here may look a domain up (it sees what is registered so far)
        if _loaded or _loading:
            return
        _loading = True
        try:
            for mod in BUILTIN_DOMAIN_MODULES:
                importlib.import_module(mod)
            try:
                from importlib.metadata import entry_points

                for ep in entry_points(group=ENTRY_POINT_GROUP):
                    obj = ep.load()
                    if callable(obj):
                        obj()
            except Exception as e:  # a broken third-party plug-in must say so, not vanish
                raise SpecError(f"a {ENTRY_POINT_GROUP} entry point failed to load: {e}") from None
            for modname in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
                try:
                    _import_plugin(modname)
                except ImportError as e:
                    raise SpecError(f"{PLUGINS_ENV}: cannot import {modname!r} ({e})") from None
            _loaded = True
        finally:
            _loading = False


def known_domains() -> list[str]:
    load_plugins()
    return sorted(_DOMAINS)


def all_domains() -> list[Domain]:
    load_plugins()
    return [_DOMAINS[n] for n in sorted(_DOMAINS)]


def get_domain(name: str) -> Domain:
    """The registered domain ``name``; SpecError (a ValueError) listing the known domains otherwise."""
    if name not in _DOMAINS:
        load_plugins()
    d = _DOMAINS.get(name)
    if d is None:
        raise UnknownDomain(f"domain {name!r} is not known; accepted: {', '.join(sorted(_DOMAINS)) or 'none'}")
    return d


def default_domain() -> str:
    """The domain of a spec that names none (the built-in registered with ``default=True``)."""
    load_plugins()
    for d in _DOMAINS.values():
        if d.default:
            return d.name
    return next(iter(_DOMAINS))


class UnknownDomain(SpecError, KeyError):
    """An unknown domain name: a SpecError for the CLI (exit 2) and a KeyError for look-up code."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def import_ref(ref: str) -> Any:
    """``"module:attr"`` -> the attribute, the module imported on demand."""
    mod, _, attr = ref.partition(":")
    return getattr(importlib.import_module(mod), attr)


def import_hook(domain: Domain, module: str | None, attr: str, default: Any = None) -> Any:
    """``module.attr`` for a domain's hook module (imported on demand), or ``default`` if either is absent."""
    if not module:
        return default
    return getattr(importlib.import_module(module), attr, default)
