"""Recipes: mergekit's YAML format as typed pydantic models.

The schema mirrors mergekit 0.1.5 so its recipes (and those of model cards) load unchanged. mergekit drops
unknown keys and parameters without a word; evomerge drops them too, so every recipe mergekit merges merges
here to the same tensors, but names each one in a warning (``strict``: an error). The models themselves
refuse unknown keys (``extra="forbid"``), so nothing reaches them unseen; every error names the field and
the offending value.
"""

from __future__ import annotations

import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from merge_core.errors import EvomergeError
from merge_core.methods import METHODS, REQUIRED, get_method
from merge_core.params import coerce, lenient_reading
from merge_core.runtime import DTYPES

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]



class StrictModel(BaseModel):
    """A YAML mapping read into a model: an unknown key is an error naming it, never silently dropped."""

    model_config = ConfigDict(extra="forbid")


class ConditionalParameter(StrictModel):
    """``{filter: substring, value: …}``: applies to tensors whose name contains ``filter``."""

    value: ScalarOrGradient
    filter: str | None = None


ParameterSetting = Union[ConditionalParameter, list[ConditionalParameter], ScalarOrGradient]
Parameters = dict[str, ParameterSetting]


class InputModel(StrictModel):
    model: str
    parameters: Parameters | None = None


class InputSlice(StrictModel):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _ordered_range(self):
        start, end = self.layer_range
        if start < 0 or end <= start:
            raise ValueError(f"layer_range {list(self.layer_range)} of {self.model} must satisfy 0 <= start < end")
        return self


class OutputSlice(StrictModel):
    sources: list[InputSlice]
    base_model: str | None = None
    residual_weight: float | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _equal_lengths(self):
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if not self.sources:
            raise ValueError("a slice needs at least one source")
        if len(lengths) > 1:
            ranges = ", ".join(f"{s.model} {list(s.layer_range)}" for s in self.sources)
            raise ValueError(f"all sources of a slice must span the same number of layers ({ranges})")
        return self


class OutputModule(StrictModel):
    """One entry of mergekit's ``modules:`` block: a module's own ``slices`` or ``models``, and parameters
    ranked between the output slice's and the global ones."""

    slices: list[OutputSlice] | None = None
    models: list[InputModel] | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _one_input_form(self):
        if bool(self.models) == bool(self.slices):
            raise ValueError("exactly one of 'models' or 'slices' must be given")
        return self


class ModelTokenSource(StrictModel):
    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None


class ZeroTokenSource(StrictModel):
    kind: Literal["zero"]


class TokenEmbedding(StrictModel):
    source: Union[ModelTokenSource, ZeroTokenSource, str, None] = None
    force: bool = False


class TokenizerSpec(StrictModel):
    source: str = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = None


class Provenance(StrictModel):
    """Where an exported recipe came from; mergekit ignores this block, evomerge uses ``seed``."""

    version: str | None = None
    seed: int | None = None
    storage: str | None = None
    study: str | None = None
    trial: int | None = None
    objective: float | None = None


class Recipe(StrictModel):
    """A merge recipe (mergekit's ``MergeConfiguration``), plus evomerge's optional provenance block."""

    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, OutputModule] | None = None
    base_model: str | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None
    evomerge: Provenance | None = None

    @model_validator(mode="after")
    def _one_input_form(self):
        if sum(map(bool, (self.models, self.slices, self.modules))) != 1:
            raise ValueError("exactly one of 'models', 'slices' or 'modules' must be given")
        if self.modules and list(self.modules) != ["default"]:
            raise ValueError(f"modules: evomerge merges single-module models, whose one module is 'default' "
                             f"(got {', '.join(map(repr, self.modules))})")
        if self.tokenizer_source and self.tokenizer:
            raise ValueError("give either 'tokenizer_source' or 'tokenizer', not both")
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:  # mergekit reads torch.bfloat16
                value = value.removeprefix("torch.")
                setattr(self, key, value)
            if value is not None and value not in DTYPES:
                raise ValueError(f"{key}: unknown dtype {value!r} (use one of {', '.join(DTYPES)})")
        return self

    def referenced_models(self) -> list[str]:
        """Every model the recipe reads, base first, in order of appearance, without repeats."""
        names: list[str] = [self.base_model] if self.base_model else []
        for part in (self, *(self.modules or {}).values()):
            for m in part.models or []:
                names.append(m.model)
            for s in part.slices or []:
                names.extend(src.model for src in s.sources)
                if s.base_model:
                    names.append(s.base_model)
        return list(dict.fromkeys(names))

    def input_form(self) -> tuple[list[InputModel] | None, list[OutputSlice] | None, Parameters | None]:
        """(models, slices, module parameters) of the one module merged: a ``modules:`` recipe's
        ``default`` module (the only module of the decoder-only models evomerge merges), else the recipe's
        own ``models`` or ``slices``."""
        if not self.modules:
            return self.models, self.slices, None
        module = self.modules["default"]
        return module.models, module.slices, module.parameters

    def to_yaml(self) -> str:
        return _to_yaml(self)


def _to_yaml(recipe: BaseModel) -> str:
    """The recipe as mergekit reads it: its fields in order, unset ones left out."""
    return yaml.safe_dump(recipe.model_dump(exclude_none=True, mode="json"), sort_keys=False)


# --- mixture of experts (mergekit-moe's format; merge_core.moe assembles it) ---------------------

GATE_MODES = ("hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random")


class Expert(StrictModel):
    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None


class MoERecipe(StrictModel):
    """mergekit-moe's ``MoEMergeConfig``, plus a ``merge_method: moe`` key, which recipes written for one
    command that merges both kinds carry."""

    merge_method: Literal["moe"] = "moe"
    base_model: str
    experts: list[Expert]
    gate_mode: Literal[GATE_MODES] = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: Literal["mixtral", "qwen"] | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype: unknown dtype {self.dtype!r} (use one of {', '.join(DTYPES)})")
        if not self.experts:
            raise ValueError("experts: at least one expert is needed")
        if not 1 <= self.experts_per_token <= len(self.experts):
            raise ValueError(f"experts_per_token: must be between 1 and the number of experts "
                             f"({len(self.experts)}), got {self.experts_per_token}")
        if len(self.shared_experts or []) > 1:
            raise ValueError("shared_experts: at most one shared expert (Qwen2-MoE has one)")
        if self.gate_mode not in ("random", "uniform_random"):
            for kind, experts in (("experts", self.experts), ("shared_experts", self.shared_experts or [])):
                for i, expert in enumerate(experts):
                    if not expert.positive_prompts:
                        raise ValueError(f"{kind}[{i}] ({expert.source_model}).positive_prompts: "
                                         f"gate_mode {self.gate_mode} needs at least one prompt")
            prompts = {(tuple(e.positive_prompts), tuple(e.negative_prompts or [])) for e in self.experts}
            if len(self.experts) > 1 and len(prompts) == 1:
                raise ValueError("experts: every expert has the same prompts, so the router cannot tell them apart")
        return self

    def referenced_models(self) -> list[str]:
        models = [self.base_model] + [e.source_model for e in self.experts + (self.shared_experts or [])]
        return list(dict.fromkeys(models))

    def to_yaml(self) -> str:
        return _to_yaml(self)


def model_card(recipe: Recipe | MoERecipe, seed: int | None) -> str:
    """The output directory's README: what made it, from what, and the recipe that redoes it."""
    from importlib.metadata import version

    sources = "\n".join(f"- `{m}`" for m in recipe.referenced_models())
    seed_line = f"\nSeed for stochastic steps: `{seed}`.\n" if seed is not None else ""
    return (f"---\ntags: [merge, evomerge]\n---\n# Merged model\n\nMade with evomerge {version('evomerge')} "
            f"using the **{recipe.merge_method}** method.\n\n## Sources\n\n{sources}\n{seed_line}\n"
            f"## Recipe\n\n```yaml\n{recipe.to_yaml()}```\n")


def describe_validation_error(err: ValidationError) -> str:
    """One line naming the first failing field and its value."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-", "tagged-union")))
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    plain = first["type"] not in ("value_error", "missing") and not isinstance(value, dict)
    shown = f" (got {value!r})" if plain else ""
    return f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}"


def validate(model: type[BaseModel], data: dict, where: str):
    """``model`` parsed from ``data``; a validation error becomes one line naming ``where`` and the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise EvomergeError(f"{where}: {describe_validation_error(exc)}") from None


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """A YAML file's top-level mapping, or a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise EvomergeError(f"{what} file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise EvomergeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise EvomergeError(f"{path}: not a text file (not UTF-8)") from None
    except OSError as exc:
        raise EvomergeError(f"{what} file {path} cannot be read: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise EvomergeError(f"{path}: expected a mapping of {what} keys, got {type(data).__name__}")
    return data


Warn = Callable[[str], None]


def _warn_on_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def load_recipe(source: str | Path | dict[str, Any], *, strict: bool = False,
                warn: Warn | None = None) -> Recipe | MoERecipe:
    """Parse a recipe from a YAML path or a dict; errors are one-line ``EvomergeError``s.

    What mergekit silently ignores (unknown keys, parameters the method does not have, ``normalize: 1.0``
    for ``true``) is ignored or read as mergekit does and named in one ``warn(message)`` each (default:
    a ``warning:`` line on stderr); with ``strict`` the first of them is an error instead.
    """
    where, data = ("recipe", source) if isinstance(source, dict) else (str(source), read_yaml_mapping(source, "recipe"))
    if not isinstance(data, dict):
        raise EvomergeError(f"{where}: expected a mapping of recipe keys, got {type(data).__name__}")
    if data.get("merge_method") == "moe":
        return validate(MoERecipe, data, where)
    notes: list[str] = []
    data = _without_unknown_keys(Recipe, data, "", notes, _KeyHints(data))
    if strict and notes:
        raise EvomergeError(f"{where}: {notes[0]} (--strict)")
    recipe = validate(Recipe, data, where)
    check_parameters(recipe, notes if not strict else None)
    for note in notes:
        (warn or _warn_on_stderr)(f"{where}: {note}")
    return recipe


# --- what mergekit ignores ------------------------------------------------------------------------

# Keys that belong elsewhere in a recipe, and where.
_ELSEWHERE = {"pad_to_multiple_of": "tokenizer.pad_to_multiple_of", "tokens": "tokenizer.tokens",
              "layer_range": "a slice source"}


class _KeyHints:
    """What to say about an ignored key: a near-miss spelling, or where the key belongs, and what applies."""

    def __init__(self, data: dict):
        self.data = data
        method = data.get("merge_method")
        self.method = METHODS.get(method) if isinstance(method, str) else None

    def method_parameters(self) -> dict[str, Any]:
        return {**self.method.params, **self.method.model_params} if self.method else {}

    def parameter_in_use(self, name: str) -> str:
        """``name = value`` as the recipe's global parameters or the method's default give it."""
        top = self.data.get("parameters")
        if isinstance(top, dict) and name in top:
            return f"{name} = {top[name]!r} from parameters"
        default = self.method_parameters().get(name)
        return (f"{name} is required and must be given under parameters" if default is REQUIRED
                else f"{name} = {default!r} (its default)")

    def note(self, model: type[BaseModel], key: str, path: str) -> str:
        fields = list(model.model_fields)
        ignored = f"{path}: ignored, as mergekit does"
        if key == "revision" and "model" in fields:
            return (f"{ignored} (it reads the model's default revision; to pin one, write the model as "
                    f"NAME@{key.upper()}, which mergekit and evomerge both read)")
        if key in self.method_parameters() and "parameters" in fields:
            return (f"{ignored}: {key!r} is a parameter of {self.method.name} and goes under 'parameters'; "
                    f"{self.parameter_in_use(key)} applies")
        if key in _ELSEWHERE:
            return f"{ignored}: {key!r} belongs in {_ELSEWHERE[key]}"
        close = difflib.get_close_matches(key, fields, n=1, cutoff=0.7)
        if close:
            used = self.data.get(close[0]) if model is Recipe else None
            shown = f"{close[0]} = {used!r} applies" if used is not None else f"{close[0]} is not set"
            return f"{ignored}: unknown key {key!r}, did you mean {close[0]!r}? ({shown})"
        return f"{ignored}: unknown key {key!r} (known here: {', '.join(fields)})"


_UNIONS = (Union, types.UnionType)


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation (a union, optional…) admits directly, not inside containers."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in _UNIONS:
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def _containers_in(annotation, kind: type) -> list:
    """The item (list) or value (dict) annotations of the containers of ``kind`` an annotation admits."""
    if typing.get_origin(annotation) is kind:
        return [typing.get_args(annotation)[-1]]
    if typing.get_origin(annotation) in _UNIONS:
        return [a for arg in typing.get_args(annotation) for a in _containers_in(arg, kind)]
    return []


def _literal_fits(model: type[BaseModel], value: dict) -> bool:
    """Whether ``value``'s literal-typed keys (a ``kind:`` tag) fit ``model``: picks a union's member."""
    for name, info in model.model_fields.items():
        if typing.get_origin(info.annotation) is Literal and value.get(name) not in typing.get_args(info.annotation):
            return False
    return True


def _without_unknown_keys(annotation, value: Any, path: str, notes: list[str], hints: _KeyHints) -> Any:
    """``value`` without the keys its model does not have (each one noted), at any depth; unchanged where
    the model is ambiguous (pydantic then reports the error)."""
    if isinstance(value, dict):
        models = [m for m in _models_in(annotation) if _literal_fits(m, value)]
        if len(models) == 1:
            model = models[0]
            kept = {}
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if key in model.model_fields:
                    kept[key] = _without_unknown_keys(model.model_fields[key].annotation, item, where, notes, hints)
                else:
                    notes.append(hints.note(model, key, where))
            return kept
        inner = _containers_in(annotation, dict)
        if not models and len(inner) == 1:
            return {k: _without_unknown_keys(inner[0], v, f"{path}.{k}", notes, hints) for k, v in value.items()}
    if isinstance(value, list):
        inner = _containers_in(annotation, list)
        if inner:
            items = Union[tuple(inner)] if len(inner) > 1 else inner[0]
            return [_without_unknown_keys(items, v, f"{path}[{i}]", notes, hints) for i, v in enumerate(value)]
    return value


def _settings_values(setting: ParameterSetting):
    """Every scalar a setting can produce (filters and gradient points included)."""
    if isinstance(setting, ConditionalParameter):
        yield from _settings_values(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from _settings_values(item)
    else:
        yield setting


def _check_block(where: str, params: Parameters | None, allowed: dict[str, Any], method: str, other: dict,
                 notes: list[str] | None) -> None:
    """Parameters of one scope: ill-typed values are errors; what mergekit ignores or reads leniently is
    noted (``notes`` None: an error)."""
    def lenient(message: str) -> None:
        if notes is None:
            raise EvomergeError(f"{message} (--strict)")
        notes.append(message)

    for name, setting in (params or {}).items():
        if name not in allowed:
            if name in other:
                lenient(f"{where}.{name}: ignored, as mergekit does: {name!r} is a {other[name]} parameter of "
                        f"{method}, not read here (give it under the top-level parameters)")
                continue
            close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            known = ", ".join(sorted(allowed)) or "none"
            lenient(f"{where}.{name}: ignored, as mergekit does: {method} has no parameter {name!r}{hint} "
                    f"(known here: {known})")
            continue
        for value in _settings_values(setting):
            coerce(name, value, allowed[name], where=f"{where}.{name}")
            reading = lenient_reading(value, allowed[name])
            if reading is not None:
                lenient(f"{where}.{name}: {value!r} read as {reading!r}, as mergekit reads it (write {reading!r})")


def check_parameters(recipe: Recipe, notes: list[str] | None = None) -> None:
    """Refuse unknown methods and ill-typed values before any work; parameters mergekit would ignore, and
    values it reads leniently, go to ``notes`` (None: they are errors too)."""
    method = get_method(recipe.merge_method)
    per_model, shared = method.model_params, method.params
    anywhere = {**shared, **per_model}
    globally = {k: "global" for k in shared}
    _check_block("parameters", recipe.parameters, anywhere, method.name, {}, notes)
    parts = [("", recipe)] + [(f"modules.{name}.", module) for name, module in (recipe.modules or {}).items()]
    for prefix, part in parts:
        if prefix:
            _check_block(f"{prefix}parameters", part.parameters, anywhere, method.name, {}, notes)
        for i, m in enumerate(part.models or []):
            _check_block(f"{prefix}models[{i}] ({m.model}).parameters", m.parameters, per_model, method.name,
                         globally, notes)
        for i, s in enumerate(part.slices or []):
            _check_block(f"{prefix}slices[{i}].parameters", s.parameters, anywhere, method.name, {}, notes)
            for j, src in enumerate(s.sources):
                _check_block(f"{prefix}slices[{i}].sources[{j}] ({src.model}).parameters", src.parameters,
                             per_model, method.name, globally, notes)
