"""The search space: Optuna dimensions ↔ mergekit recipes.

Each searched parameter becomes one or more float dimensions, one per (model, group | block | control
point). ``build_recipe`` turns one point of the space into a plain mergekit recipe dict, so every
candidate the search scores is a recipe a user can merge or hand to mergekit.

With a method list the method is one more dimension, categorical (``METHOD_KEY``), and the space is
conditional: a parameter's dimensions belong to the listed methods that have the parameter (a weight means the
same to task arithmetic, TIES and DARE, so they share it), and a trial suggests only its method's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_core.methods import REQUIRED, get_method
from search.config import SearchConfig

HANDWRITTEN = {"density": 0.5, "t": 0.5}
METHOD_KEY = "method"


@dataclass(frozen=True)
class Dimension:
    key: str
    param: str
    model: str | None
    group: str | None
    block: int | None
    point: int | None
    low: float
    high: float
    methods: tuple[str, ...] = ()  # the listed methods that have this parameter
    step: float | None = None  # a discrete dimension (a layer path's keep: 0 or 1)


def model_labels(models: list[str]) -> dict[str, str]:
    """Short unique labels (directory names) for parameter keys and tables."""
    labels: dict[str, str] = {}
    for ref in models:
        label = Path(ref).name or ref
        while label in labels.values():
            label += "_"
        labels[ref] = label
    return labels


def method_params(method_name: str) -> tuple[set[str], set[str]]:
    """(per-model parameters, global parameters) of a method that change its result (``inert`` ones left out)."""
    method = get_method(method_name)
    return set(method.model_params) - method.inert, set(method.params) - method.inert


def dimensions(config: SearchConfig, num_layers: int) -> list[Dimension]:
    labels = model_labels(config.models)
    dims = []
    for param, spec in config.parameters.items():
        having = tuple(m for m in config.methods if param in set.union(*method_params(m))) or tuple(config.methods)
        per_model = any(param in method_params(m)[0] for m in having)
        owners = config.models if per_model else [None]
        for model in owners:
            stem = f"{param}[{labels[model]}]" if model else param
            if spec.granularity == "global":
                parts = [(stem, None, None, None)]
            elif spec.granularity == "groups":
                parts = [(f"{stem}.{g}", g, None, None) for g in [*spec.groups, "rest"]]
            elif spec.granularity == "blocks":
                parts = [(f"{stem}.b{b}", None, b, None) for b in range(math.ceil(num_layers / config.block_size))]
            else:
                parts = [(f"{stem}.p{p}", None, None, p) for p in range(spec.points)]
            dims += [Dimension(key, param, model, g, b, p, spec.low, spec.high, having) for key, g, b, p in parts]
    return dims


def dims_for(dims: list[Dimension], method: str) -> list[Dimension]:
    """The dimensions a trial of ``method`` suggests."""
    return [d for d in dims if method in d.methods]


def handwritten_point(config: SearchConfig, dims: list[Dimension], method: str | None = None) -> dict[str, Any]:
    """What a user would write by hand: equal weights, density 0.5, t 0.5, other defaults; clipped to bounds.
    With a method list, ``method``'s (default: the first listed), the method itself included."""
    method_name = method or config.methods[0]
    method = get_method(method_name)
    point: dict[str, Any] = {METHOD_KEY: method_name} if len(config.methods) > 1 else {}
    for d in dims_for(dims, method_name):
        default = {**method.model_params, **method.params}.get(d.param)
        if d.param == "weight":
            value = 1.0 / len(config.models)
        elif d.param in HANDWRITTEN:
            value = HANDWRITTEN[d.param]
        elif isinstance(default, (int, float)) and not isinstance(default, bool) and default is not REQUIRED:
            value = float(default)
        else:
            value = (d.low + d.high) / 2
        point[d.key] = min(max(value, d.low), d.high)
    return point


def _setting(config: SearchConfig, dims: list[Dimension], values: dict[str, float], block: int | None) -> Any:
    """The recipe value of one (param, model) from its dimensions, for one block in blocks mode."""
    spec = config.parameters[dims[0].param]
    if spec.granularity == "global":
        return values[dims[0].key]
    if spec.granularity == "blocks":
        return values[next(d.key for d in dims if d.block == block)]
    if spec.granularity == "curve":
        return [values[d.key] for d in sorted(dims, key=lambda d: d.point)]
    conditions = [{"filter": d.group, "value": values[d.key]} for d in dims if d.group != "rest"]
    return conditions + [{"value": values[next(d.key for d in dims if d.group == "rest")]}]


def point_method(config: SearchConfig, values: dict[str, Any]) -> str:
    """The merge method of a point: its categorical value with a method list, else the one method."""
    return values.get(METHOD_KEY, config.methods[0]) if len(config.methods) > 1 else config.methods[0]


def build_recipe(config: SearchConfig, dims: list[Dimension], values: dict[str, Any], num_layers: int,
                 paths: dict[str, str] | None = None) -> dict[str, Any]:
    """A mergekit recipe for one point of the space; ``paths`` maps model refs to the paths to write."""
    method_name = point_method(config, values)
    method = get_method(method_name)
    paths = paths or {}
    ref = lambda m: paths.get(m, m)  # noqa: E731
    by_owner: dict[tuple[str, str | None], list[Dimension]] = {}
    for d in dims_for(dims, method_name):
        owner = d.model if d.param in method.model_params else None
        if owner is None and d.model is not None:
            continue  # a per-model parameter of other methods that this method takes once: not in the space
        by_owner.setdefault((d.param, owner), []).append(d)
    blocked = any(config.parameters[p].granularity == "blocks" for p in config.parameters)
    uses_base = not method.base_is_input
    known = {*method.model_params, *method.params}

    def params_of(model: str | None, block: int | None) -> dict[str, Any]:
        out = {param: _setting(config, ds, values, block) for (param, owner), ds in by_owner.items()
               if owner == model}
        if model is None:
            out.update({k: v for k, v in config.fixed.items() if k in known})
        return out

    recipe: dict[str, Any] = {"merge_method": method_name, "dtype": config.dtype}
    if uses_base:
        recipe["base_model"] = ref(config.base_model)
    if not blocked:
        recipe["models"] = [{"model": ref(m), **({"parameters": p} if (p := params_of(m, None)) else {})}
                            for m in config.models]
        if shared := params_of(None, None):
            recipe["parameters"] = shared
        return recipe
    slices = []
    for block in range(math.ceil(num_layers / config.block_size)):
        layer_range = [block * config.block_size, min(num_layers, (block + 1) * config.block_size)]
        members = ([config.base_model] if uses_base else []) + config.models
        sources = [{"model": ref(m), "layer_range": layer_range,
                    **({"parameters": p} if (p := params_of(m, block)) else {})} for m in members]
        slices.append({"sources": sources, **({"parameters": s} if (s := params_of(None, block)) else {})})
    recipe["slices"] = slices
    return recipe


# Methods whose result is exactly one source when that source has weight 1, every other weight 0 and nothing
# is dropped (density 1, λ 1): base + 1·(source − base), and TIES' election then follows that source's signs.
SOURCE_REPRODUCING = frozenset({"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                                "breadcrumbs_ties", "della", "della_linear"})
SOURCE_SETTINGS = {"density": 1.0, "lambda": 1.0}
INERT_AT_FULL_DENSITY = frozenset({"epsilon", "gamma"})  # only shape what density drops


def source_points(config: SearchConfig, dims: list[Dimension]) -> dict[str, dict[str, Any]]:
    """Each source model as a point of the space, by label, where the space holds one (see
    ``SOURCE_REPRODUCING``: weights 0 and 1, density 1 and λ 1 within their bounds, every other searched
    parameter inert there, and for ``linear`` and normalized merges the result unchanged by the other weights);
    empty otherwise. With a method list, the point of the first listed method that holds one. The search tells
    the sampler these points with the sources' own scores, as warm starts that cost no evaluation."""
    method = next((m for m in config.methods if m in SOURCE_REPRODUCING), None)
    if method is None or "weight" not in config.parameters:
        return {}
    if any(config.fixed.get(name, value) != value for name, value in SOURCE_SETTINGS.items()):
        return {}  # e.g. a fixed density below 1 drops part of every task vector
    point_of: dict[str, dict[str, Any]] = {}
    labels = model_labels(config.models)
    for source in config.models:
        point: dict[str, Any] = {METHOD_KEY: method} if len(config.methods) > 1 else {}
        for d in dims_for(dims, method):
            if d.param == "weight":
                value = 1.0 if d.model == source else 0.0
            elif d.param in SOURCE_SETTINGS:
                value = SOURCE_SETTINGS[d.param]
            elif d.param in INERT_AT_FULL_DENSITY:
                value = handwritten_point(config, [d], method)[d.key]
            else:
                return {}
            if not d.low <= value <= d.high:
                return {}
            point[d.key] = value
        point_of[labels[source]] = point
    return point_of
