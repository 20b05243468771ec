"""Dataset specs: validation, normalisation, loading from YAML/JSON and the content hash.

A spec is a discriminated union on ``domain``; each domain registers its model in its ``Domain`` description
(``schemas.domain``). ``load_spec`` turns any validation failure into one readable SpecError line.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.domain import all_domains, default_domain, get_domain, known_domains
from schemas.errors import SpecError
from schemas.units import MmRange

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$|^[A-Za-z]{3}$")


class ImageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(512, ge=64, le=4096, description="image width and height in pixels")
    spacing_mm: MmRange("image.spacing_mm") = Field((0.6, 0.8), description="pixel spacing in mm: value or [min, max]")

    @field_validator("spacing_mm")
    @classmethod
    def _spacing(cls, v):
        if v[0] <= 0 or v[1] > 5.0:
            raise ValueError(f"pixel spacing {v[0]:g}-{v[1]:g} mm is outside the accepted 0.05 to 5 mm")
        return v


class GeneratorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("procedural", description="render backend: procedural (CPU) or controlnet (GPU)")
    options: dict[str, Any] = Field(default_factory=dict, description="backend options, checked by the backend")


class Splits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: float = Field(0.8, ge=0, le=1)
    val: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _sum(self) -> "Splits":
        s = self.train + self.val + self.test
        if abs(s - 1.0) > 1e-6:
            raise ValueError(f"split fractions train+val+test sum to {s:g}; they must sum to 1")
        return self


class QCSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_attempts: int = Field(4, ge=1, le=20, description="generation attempts per sample before it is kept as failed")
    cnr_min: float = Field(3.0, ge=0, description="minimum contrast-to-noise ratio of each finding vs its surround")
    size_tolerance_mm: float = Field(0.5, ge=0, description="allowed |measured - requested| diameter (or 1 pixel)")
    min_in_region: float = Field(0.99, ge=0, le=1, description="share of a finding's pixels inside its requested region")


class BaseSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="dataset name: lowercase letters, digits, '.', '_' or '-'")
    description: str = ""
    samples: int = Field(ge=1, le=10_000_000, description="number of samples")
    seed: int = Field(0, ge=0, description="master seed; with the spec it fixes every byte")
    splits: Splits = Field(default_factory=Splits)
    watermark: bool = Field(True, description="embed an invisible watermark in every image")
    schedule: str | None = Field(None, description="cron expression for scheduled rebuilds (pairforge serve)")
    shard_size: int = Field(100, ge=1, le=10_000,
                            description="samples per shard (one orchestration task; a few seconds of work each)")
    generator: GeneratorSpec = Field(default_factory=GeneratorSpec)
    qc: QCSpec = Field(default_factory=QCSpec)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"dataset name {v!r} is not allowed; use 1-64 lowercase letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        return v

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is None:
            return v
        fields = v.split()
        if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
            raise ValueError(f"schedule {v!r} is not a 5-field cron expression like '0 2 * * *'")
        return v


def __getattr__(name: str):
    """Names that moved to the domain modules (``SPEC_MODELS``, a domain's spec classes), found through the
    registry so that old imports keep working."""
    if name.startswith("__"):
        raise AttributeError(name)
    if name == "SPEC_MODELS":
        return {d.name: d.spec_model for d in all_domains()}
    import importlib

    for d in all_domains():
        mod = importlib.import_module(d.schema_module)
        if name in vars(mod):
            return vars(mod)[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def spec_json_schema() -> dict:
    """The JSON schema of every registered domain's spec (a fresh copy; built once per set of domains)."""
    import copy

    return copy.deepcopy(_spec_json_schema(tuple(d.spec_model for d in all_domains())))


@functools.lru_cache(maxsize=4)
def _spec_json_schema(models_key: tuple) -> dict:
    from pydantic import TypeAdapter
    from typing import Annotated, Union

    models = models_key
    union = Annotated[Union[models], Field(discriminator="domain")] if len(models) > 1 else models[0]
    schema = TypeAdapter(union).json_schema()
    schema["title"] = "pairforge dataset spec"
    return schema


def _fields_at(model: Any, loc: tuple) -> list[str]:
    """Field names of the (nested) model at ``loc`` (the parent of an unknown field), [] when not a model."""
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(getattr(model, "model_fields", {}))


def _unknown_field(e: ValidationError, model: Any) -> str | None:
    """"unknown field 'sampels' (did you mean 'samples'?)" for the first misspelt field; None when there is none."""
    import difflib

    errors = e.errors()
    extra = next((x for x in errors if x["type"] == "extra_forbidden"), None)
    if extra is None:
        return None
    *parent, name = [p for p in extra["loc"] if not (isinstance(p, str) and p in set(known_domains()))]
    missing = [str(x["loc"][-1]) for x in errors if x["type"] == "missing" and list(x["loc"][:-1]) == parent]
    candidates = missing or _fields_at(model, tuple(parent)) if model is not None else missing
    close = difflib.get_close_matches(str(name), candidates or [], n=1, cutoff=0.6)
    where = ".".join(str(p) for p in parent)
    what = f"unknown field {where + '.' if where else ''}{name!r}".replace(f"{where}.'", f"'{where}.")
    hint = f" (did you mean {close[0]!r}?)" if close else "; check the spelling against `pairforge schema`"
    rest = [x for x in errors if x is not extra and not (close and x["type"] == "missing" and
                                                           str(x["loc"][-1]) == close[0])]
    return what + hint + (f" (and {len(rest)} more)" if rest else "")


def format_validation_error(e: ValidationError, model: Any = None) -> str:
    unknown = _unknown_field(e, model)
    if unknown is not None:
        return unknown
    err = e.errors()[0]
    domains = set(known_domains())
    loc = ".".join(str(x) for x in err["loc"] if not (isinstance(x, str) and x in domains))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field; check the spelling against `pairforge schema`"
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif err["type"] == "literal_error":
        msg = f"{err.get('input')!r} is not accepted; {msg}"
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{loc}: {msg}{more}" if loc else f"{msg}{more}"


def validate_spec(data: Any) -> BaseSpec:
    """Validate a parsed spec mapping into the model of its domain."""
    if not isinstance(data, dict):
        raise SpecError(f"a spec must be a mapping of fields, not {type(data).__name__}")
    domain = data.get("domain", default_domain())
    if not isinstance(domain, str):
        raise SpecError(f"domain {domain!r} is not known; accepted: {', '.join(known_domains())}")
    model = get_domain(domain).spec_model
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"invalid spec: {format_validation_error(e, model)}") from None
    except SpecError as e:
        raise SpecError(f"invalid spec: {e}") from None


# Limits on a spec document, checked before anything is validated or allocated: a spec is a few dozen values, so
# these only stop hostile input (YAML alias bombs, thousands of nested brackets, numbers of thousands of digits).
MAX_SPEC_DEPTH = 32
MAX_SPEC_VALUES = 100_000
MAX_SPEC_CHARS = 1_000_000


class _SpecLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (YAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base constructor names it
                break
            if dup:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _check_size(data: Any, source: str) -> None:
    """Refuse documents nested deeper than MAX_SPEC_DEPTH or holding more than MAX_SPEC_VALUES values once aliases
    are expanded (iterative: no recursion on hostile input)."""
    stack = [(data, 1)]
    count = 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_SPEC_VALUES:
            raise SpecError(f"{source}: the spec expands to more than {MAX_SPEC_VALUES:,} values (YAML aliases?); "
                            "a spec is a few dozen fields")
        if depth > MAX_SPEC_DEPTH:
            raise SpecError(f"{source}: the spec is nested more than {MAX_SPEC_DEPTH} levels deep")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
            stack.extend((k, depth + 1) for k in value)
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)


def _parse_yaml(text: str, source: str) -> Any:
    if len(text) > MAX_SPEC_CHARS:
        raise SpecError(f"{source}: the spec is {len(text):,} characters long; a spec is at most "
                        f"{MAX_SPEC_CHARS:,}")
    depth = deepest = 0
    for ch in text:  # flow brackets, counted before YAML's recursive parser sees thousands of them
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    if deepest > 2 * MAX_SPEC_DEPTH:
        raise SpecError(f"{source}: the spec is nested more than {MAX_SPEC_DEPTH} levels deep")
    if "\x00" in text:
        raise SpecError(f"{source}: the spec contains a NUL character; write it as plain text")
    try:
        data = yaml.load(text, Loader=_SpecLoader)  # JSON is YAML
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise SpecError(f"{source}: invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise SpecError(f"{source}: the spec is nested more than {MAX_SPEC_DEPTH} levels deep") from None
    except ValueError as e:  # int() refuses numbers of thousands of digits
        if "digits" in str(e):
            raise SpecError(f"{source}: a number in the spec has thousands of digits; no field accepts that") from None
        raise SpecError(f"{source}: a value in the spec cannot be read: {e}") from None
    _check_size(data, source)
    return data


def load_spec_text(text: str, source: str = "<spec>") -> BaseSpec:
    data = _parse_yaml(text, source)
    if data is None:
        raise SpecError(f"{source}: the spec is empty")
    try:
        return validate_spec(data)
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None


def load_spec(path: str | Path) -> BaseSpec:
    p = Path(path)
    try:
        if not p.exists():
            raise SpecError(f"spec file {str(p)[:200]!r} does not exist")
        if p.is_dir():
            raise SpecError(f"spec path {str(p)[:200]!r} is a folder; give a .yaml or .json file")
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:  # e.g. a name too long for the file system, a binary file
        why = " ".join(str(getattr(e, "strerror", None) or e).split())
        raise SpecError(f"spec file {str(p)[:200]!r} cannot be read: {why}") from None
    return load_spec_text(text, source=str(p))


def normalised_spec(spec: BaseSpec) -> dict:
    return spec.model_dump(mode="json")


def spec_hash(spec: BaseSpec) -> str:
    """sha256 of the normalised spec, minus fields that do not change a byte of the data (schedule, description)."""
    d = normalised_spec(spec)
    d.pop("schedule", None)
    d.pop("description", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
