"""From a recipe to a list of tensor jobs: which source tensors, which parameters, for each output tensor.

Planning reads only names, shapes and configs, so every structural error (missing layers, shape or
architecture mismatch, missing parameters) is reported before any tensor is computed or written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from merge_core.architecture import (
    count_layers,
    is_embedding,
    is_pre_weight,
    parse_layer,
    tied_embedding_name,
    with_layer_count,
)
from merge_core.errors import EvomergeError
from merge_core.methods import REQUIRED, MergeMethod, check_inputs, get_method
from merge_core.params import resolve
from merge_core.recipe import InputSlice, OutputSlice, Recipe

# Methods whose base is the first model when a recipe names none (slerp recipes often give no base_model).
FIRST_MODEL_IS_BASE = ("slerp",)
# Defaults evomerge adds where mergekit requires a value: a tokenizer recipe may give linear no
# weights, which evomerge reads as equal weights (a plain average, since linear normalizes by default).
DEFAULT_MODEL_PARAMS = {"linear": {"weight": 1.0}}


class Source(Protocol):
    """What planning and merging need of a model: a checkpoint on disk or tensors already in memory."""

    config: dict

    @property
    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str, dtype: torch.dtype | None = None, device: str = "cpu") -> torch.Tensor: ...


@dataclass
class TensorJob:
    """One output tensor: its inputs (model, tensor name), base position and resolved parameters."""

    name: str
    models: list[str]
    tensor_names: list[str]
    base: int | None
    model_params: list[dict[str, Any]]
    params: dict[str, Any]
    shape: tuple[int, ...]
    permute_vocabulary: bool = False  # rows are tokens: align them to the output vocabulary first


@dataclass
class MergePlan:
    method: MergeMethod
    jobs: list[TensorJob]
    config: dict
    template_model: str
    vocabulary: Any = None  # merge_core.vocab.Vocabulary when the recipe merges tokenizers


def _param_scopes(src: InputSlice | None, out_slice: OutputSlice, recipe: Recipe) -> list[dict | None]:
    own = [src.parameters] if src is not None else []
    return [*own, out_slice.parameters, recipe.input_form()[2], recipe.parameters]


def _normalized_slices(recipe: Recipe, sources: dict[str, Source]) -> list[OutputSlice]:
    """The ``models:`` form is one slice over every layer of every model, the base appended if unlisted."""
    models, slices, _ = recipe.input_form()
    if slices:
        return slices
    srcs = []
    for m in models:
        n = count_layers(sources[m.model].names, sources[m.model].config, m.model)
        srcs.append(InputSlice(model=m.model, layer_range=(0, n), parameters=m.parameters))
    if recipe.base_model and recipe.base_model not in [m.model for m in models]:
        n = count_layers(sources[recipe.base_model].names, sources[recipe.base_model].config, recipe.base_model)
        srcs.append(InputSlice(model=recipe.base_model, layer_range=(0, n)))
    lengths = {s.layer_range[1] for s in srcs}
    if len(lengths) > 1:
        counts = ", ".join(f"{s.model}: {s.layer_range[1]}" for s in srcs)
        raise EvomergeError(f"models have different numbers of layers ({counts})")
    return [OutputSlice(sources=srcs)]


def check_interpolation_base(method: MergeMethod, recipe: Recipe, out_slice: OutputSlice, where: str) -> None:
    """A slerp's base_model is its t=0 end: one that is not among the slice's two sources would be silently
    replaced by the first source, so it is refused, as mergekit refuses it."""
    base = out_slice.base_model or recipe.base_model
    models = [s.model for s in out_slice.sources]
    if method.name == "slerp" and base is not None and base not in models:
        raise EvomergeError(f"{where}: slerp interpolates from its base_model (t=0) to the other model (t=1), "
                            f"but base_model {base} is not among the slice's sources ({', '.join(models)}); "
                            f"list it as a source or leave base_model out (then {models[0]} is t=0)")


def _slice_base(method: MergeMethod, recipe: Recipe, out_slice: OutputSlice, where: str) -> str | None:
    models = [s.model for s in out_slice.sources]
    base = out_slice.base_model or recipe.base_model
    if base is None and method.name in FIRST_MODEL_IS_BASE:
        base = models[0]
    if base is not None and base not in models:
        if method.requires_base:
            raise EvomergeError(f"{where}: base_model {base} is not among the slice's sources")
        base = None
    check_inputs(method, len(models), base is not None, where)
    return base


def _check_layer_range(src: InputSlice, source: Source) -> None:
    n = count_layers(source.names, source.config, src.model)
    if src.layer_range[1] > n:
        raise EvomergeError(f"layer_range {list(src.layer_range)} of {src.model} is beyond its {n} layers")


def _hidden_key(config: dict) -> str | None:
    return next((k for k in ("hidden_size", "n_embd", "d_model") if isinstance(config.get(k), int)), None)


class _Planner:
    def __init__(self, recipe: Recipe, sources: dict[str, Source], vocabulary: Any = None):
        self.recipe = recipe
        self.sources = sources
        self.vocabulary = vocabulary
        self.method = get_method(recipe.merge_method)
        self.jobs: list[TensorJob] = []

    def tensor_name_in(self, model: str, name: str) -> str:
        """``name`` in ``model``; an absent LM head reads the tied input embedding, as transformers does."""
        source = self.sources[model]
        if name in source.names:
            return name
        tied = tied_embedding_name(source.names) if name.startswith(("lm_head", "embed_out")) else None
        if tied is not None and source.config.get("tie_word_embeddings", True):
            return tied
        raise EvomergeError(f"tensor {name} is missing from {model}")

    def add(self, out_name: str, models: list[str], names: list[str], base: str | None,
            scopes: list[list[dict | None]], slice_scopes: list[dict | None], t: float) -> None:
        shapes = [tuple(self.sources[m].shape(n)) for m, n in zip(models, names)]
        permute = self.vocabulary is not None and is_embedding(out_name) and all(
            shape[0] == self.sources[m].config.get("vocab_size") for m, shape in zip(models, shapes))
        if permute:
            shapes = [(self.vocabulary.rows, *shape[1:]) for shape in shapes]
        for m, shape in zip(models[1:], shapes[1:]):
            if shape != shapes[0]:
                hint = (" (vocabulary sizes differ: add a tokenizer_source or tokenizer block)"
                        if is_embedding(out_name) and shape[1:] == shapes[0][1:] else "")
                raise EvomergeError(f"tensor {out_name}: shape {list(shapes[0])} in {models[0]} "
                                    f"but {list(shape)} in {m}{hint}")
        base_index = models.index(base) if base in models else None
        model_params = []
        for i, (m, n) in enumerate(zip(models, names)):
            values = {}
            for pname, default in self.method.model_params.items():
                default = DEFAULT_MODEL_PARAMS.get(self.method.name, {}).get(pname, default)
                if i == base_index and default is REQUIRED and not any(pname in (s or {}) for s in scopes[i]):
                    continue
                values[pname] = resolve(pname, default, scopes[i], n, t, model=m)
            model_params.append(values)
        params = {p: resolve(p, d, slice_scopes, out_name, t) for p, d in self.method.params.items()}
        if self.method.check is not None:
            self.method.check(model_params, params)
        self.jobs.append(TensorJob(out_name, models, names, base_index, model_params, params, tuple(shapes[0]),
                                   permute_vocabulary=permute))

    def check_configs_match_weights(self) -> None:
        """A config.json that disagrees with its own tensors (another vocabulary or hidden size) would build
        a live model or an output config that the merged weights do not fit."""
        for ref, source in self.sources.items():
            embedding = tied_embedding_name(source.names)
            shape = tuple(source.shape(embedding)) if embedding else ()
            if len(shape) != 2:
                continue
            for key, size in (("vocab_size", shape[0]), (_hidden_key(source.config), shape[1])):
                said = source.config.get(key) if key else None
                if isinstance(said, int) and said != size:
                    raise EvomergeError(f"{ref}: config.json says {key}={said} but its {embedding} is "
                                        f"{list(shape)}")

    def check_architectures(self) -> None:
        kinds = {ref: (s.config.get("model_type"), tuple(s.config.get("architectures") or ())) for ref, s in
                 self.sources.items()}
        first_ref, first = next(iter(kinds.items()))
        for ref, kind in kinds.items():
            if kind != first:
                raise EvomergeError(f"models have different architectures: {first_ref} is {_kind_name(first)}, "
                                    f"{ref} is {_kind_name(kind)}")

    def plan(self) -> MergePlan:
        self.check_architectures()
        self.check_configs_match_weights()
        slices = _normalized_slices(self.recipe, self.sources)
        bases = []
        for i, s in enumerate(slices):
            for src in s.sources:
                if src.model not in self.sources:
                    raise EvomergeError(f"model {src.model} was not loaded")
                _check_layer_range(src, self.sources[src.model])
            check_interpolation_base(self.method, self.recipe, s, f"slices[{i}]")
            bases.append(_slice_base(self.method, self.recipe, s, f"slices[{i}]"))

        template = self.recipe.base_model or slices[0].sources[0].model
        template_names = self.sources[template].names
        pre = [n for n in template_names if not parse_layer(n) and is_pre_weight(n)]
        post = [n for n in template_names if not parse_layer(n) and not is_pre_weight(n)]

        def add_outer(names: list[str], out_slice: OutputSlice, base: str | None) -> None:
            models = [s.model for s in out_slice.sources]
            scopes = [_param_scopes(s, out_slice, self.recipe) for s in out_slice.sources]
            for name in names:
                self.add(name, models, [self.tensor_name_in(m, name) for m in models], base, scopes,
                         _param_scopes(None, out_slice, self.recipe), 0.0)

        add_outer(pre, slices[0], bases[0])
        source_layers: list[int] = []
        out_index = 0
        for out_slice, base in zip(slices, bases):
            first = out_slice.sources[0]
            length = first.layer_range[1] - first.layer_range[0]
            models = [s.model for s in out_slice.sources]
            scopes = [_param_scopes(s, out_slice, self.recipe) for s in out_slice.sources]
            for offset in range(length):
                t = offset / (length - 1) if length > 1 else 1.0
                layer_names = [p for p in map(parse_layer, self.sources[first.model].names)
                               if p and p.index == first.layer_range[0] + offset]
                for layer_name in layer_names:
                    names = [layer_name.at(s.layer_range[0] + offset) for s in out_slice.sources]
                    for m, n in zip(models, names):
                        if n not in self.sources[m].names:
                            raise EvomergeError(f"tensor {n} is missing from {m}")
                    self.add(layer_name.at(out_index), models, names, base, scopes,
                             _param_scopes(None, out_slice, self.recipe), t)
                source_layers.append(first.layer_range[0] + offset)
                out_index += 1
        add_outer(post, slices[-1], bases[-1])

        template_config = self.sources[template].config
        n_in = count_layers(self.sources[template].names, template_config, template)
        config = with_layer_count(template_config, source_layers, n_in)
        if self.vocabulary is not None:
            config["vocab_size"] = self.vocabulary.rows
        return MergePlan(self.method, self.jobs, config, template, self.vocabulary)


def _kind_name(kind: tuple) -> str:
    """(model_type, architectures) as a user knows it: the first architecture class, else the model type."""
    return kind[1][0] if kind[1] else kind[0]


def plan_merge(recipe: Recipe, sources: dict[str, Source], vocabulary: Any = None) -> MergePlan:
    """``vocabulary`` (from ``merge_core.vocab.build_vocabulary``) lets token-indexed tensors differ in rows."""
    return _Planner(recipe, sources, vocabulary).plan()
