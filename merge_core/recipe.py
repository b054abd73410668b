"""Recipes: mergekit's YAML format as typed pydantic models.

The schema mirrors mergekit 0.1.5 so its recipes (and the seeds' examples) load unchanged; unknown keys
are refused (``extra="forbid"``), and every error names the field and the offending value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from merge_core.errors import EvomergeError
from merge_core.methods import get_method
from merge_core.params import coerce

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]

DTYPES = ("float32", "float16", "bfloat16", "float64")


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
        if bool(self.models) == bool(self.slices):
            raise ValueError("exactly one of 'models' or 'slices' must be given")
        if self.tokenizer_source and self.tokenizer:
            raise ValueError("give either 'tokenizer_source' or 'tokenizer', not both")
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPES:
                raise ValueError(f"{key}: unknown dtype {value!r} (use one of {', '.join(DTYPES)})")
        return self

    def referenced_models(self) -> list[str]:
        """Every model the recipe reads, base first, in order of appearance, without repeats."""
        names: list[str] = [self.base_model] if self.base_model else []
        for m in self.models or []:
            names.append(m.model)
        for s in self.slices or []:
            names.extend(src.model for src in s.sources)
            if s.base_model:
                names.append(s.base_model)
        return list(dict.fromkeys(names))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True, mode="json"), sort_keys=False)


def describe_validation_error(err: ValidationError) -> str:
    """One line naming the first failing field and its value."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-", "tagged-union")))
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    shown = f" (got {value!r})" if first["type"] not in ("value_error", "missing") and not isinstance(value, dict) else ""
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


def load_recipe(source: str | Path | dict[str, Any]) -> Recipe:
    """Parse a recipe from a YAML path or a dict; errors are one-line ``EvomergeError``s."""
    where, data = ("recipe", source) if isinstance(source, dict) else (str(source), read_yaml_mapping(source, "recipe"))
    if not isinstance(data, dict):
        raise EvomergeError(f"{where}: expected a mapping of recipe keys, got {type(data).__name__}")
    if data.get("merge_method") == "moe":
        from merge_core.moe import load_moe_recipe  # imported here: moe builds on the engine, which imports us

        return load_moe_recipe(data, where)
    recipe = validate(Recipe, data, where)
    check_parameters(recipe)
    return recipe


def _settings_values(setting: ParameterSetting):
    """Every scalar a setting can produce (filters and gradient points included)."""
    if isinstance(setting, ConditionalParameter):
        yield from _settings_values(setting.value)
    elif isinstance(setting, list):
        for item in setting:
            yield from _settings_values(item)
    else:
        yield setting


def _check_block(where: str, params: Parameters | None, allowed: dict[str, Any], method: str, other: dict) -> None:
    for name, setting in (params or {}).items():
        if name not in allowed:
            if name in other:
                raise EvomergeError(f"{where}.{name}: {name!r} is a {other[name]} parameter of {method}, not allowed here")
            known = ", ".join(sorted(allowed)) or "none"
            raise EvomergeError(f"{where}.{name}: unknown parameter {name!r} for {method} (known here: {known})")
        for value in _settings_values(setting):
            coerce(name, value, allowed[name], where=f"{where}.{name}")


def check_parameters(recipe: Recipe) -> None:
    """Refuse unknown methods, misplaced or unknown parameters and ill-typed values before any work."""
    method = get_method(recipe.merge_method)
    per_model, shared = method.model_params, method.params
    anywhere = {**shared, **per_model}
    _check_block("parameters", recipe.parameters, anywhere, method.name, {})
    for i, m in enumerate(recipe.models or []):
        _check_block(f"models[{i}] ({m.model}).parameters", m.parameters, per_model, method.name,
                     {k: "global" for k in shared})
    for i, s in enumerate(recipe.slices or []):
        _check_block(f"slices[{i}].parameters", s.parameters, anywhere, method.name, {})
        for j, src in enumerate(s.sources):
            _check_block(f"slices[{i}].sources[{j}] ({src.model}).parameters", src.parameters, per_model,
                         method.name, {k: "global" for k in shared})
