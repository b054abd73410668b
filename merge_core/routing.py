"""Layer paths: a model made of other models' decoder layers in any order, live and as a recipe.

A path is an ordered list of slots, each one source's layer with a scale on what the layer adds to the
residual stream. As a recipe it is mergekit's ``passthrough`` with one slice per run of consecutive
layers of one model and one scale (``scale`` on the ``o_proj`` and ``down_proj`` tensors, the two that
write into the residual stream), which mergekit and ``evomerge merge`` both write to disk and plain
transformers loads.

Live, a path costs no merge: ``LayerBank`` builds each source's modules over the source's tensors as they
are held in memory, and ``assemble`` points one live model's layer list at per-slot shallow copies of
those modules (new module objects, the same parameter tensors), so that each slot has its own
``layer_idx`` (its KV-cache entry) and its own scale, applied by a forward hook on its output
projections instead of a scaled copy of their weights. The embeddings come from the first slot's model
and the final norm and LM head from the last slot's, as in mergekit's passthrough; the live config's
layer count and per-layer lists (``layer_types``) follow the path.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from merge_core.architecture import layer_count_key
from merge_core.errors import EvomergeError

__all__ = ["SCALED", "Slot", "LayerBank", "live_model", "assemble", "path_recipe", "path_of_recipe", "check_same_shape",
           "runs"]

# Tensor-name filters of the projections that write a layer's attention and MLP outputs into the residual
# stream: scaling them scales what the layer adds (mergekit frankenmerges scale the same two).
SCALED = ("o_proj", "down_proj")
# A norm after a branch's output projection cancels a scale on the projection (Gemma 2/3, OLMo 2).
_POST_NORMS = ("post_feedforward_layernorm",)
# Config keys that must agree between the sources of one path (the layer count may differ).
_SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size", "tie_word_embeddings")


@dataclass(frozen=True)
class Slot:
    """One layer of a path: layer ``layer`` of source ``model``, what it adds to the residual times ``scale``."""

    model: str
    layer: int
    scale: float = 1.0


def runs(path: Sequence[Slot]) -> list[tuple[str, int, int, float]]:
    """(model, first layer, end layer, scale) of each run of consecutive layers of one model and one scale."""
    out: list[list] = []
    for slot in path:
        if out and out[-1][0] == slot.model and out[-1][2] == slot.layer and out[-1][3] == slot.scale:
            out[-1][2] += 1
        else:
            out.append([slot.model, slot.layer, slot.layer + 1, slot.scale])
    return [tuple(r) for r in out]


def path_recipe(path: Sequence[Slot], dtype: str, names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The mergekit passthrough recipe of ``path``; ``names`` maps a slot's model to the name the recipe uses."""
    if not path:
        raise EvomergeError("a layer path needs at least one layer")
    slices = []
    for model, start, end, scale in runs(path):
        source: dict[str, Any] = {"model": (names or {}).get(model, model), "layer_range": [start, end]}
        if scale != 1.0:
            source["parameters"] = {"scale": [*({"filter": f, "value": scale} for f in SCALED), {"value": 1.0}]}
        slices.append({"sources": [source]})
    return {"merge_method": "passthrough", "slices": slices, "dtype": dtype}


def _slice_scale(source: Mapping[str, Any], where: str) -> float:
    """The residual scale of one passthrough slice source: none, or the same value on every ``SCALED`` filter
    and 1 elsewhere (what ``path_recipe`` writes); another scale cannot be applied without copying weights."""
    scale = (source.get("parameters") or {}).get("scale")
    if scale is None:
        return 1.0
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if scale == 1:
            return 1.0
    elif isinstance(scale, list):
        by_filter = {c.get("filter"): c.get("value") for c in scale if isinstance(c, Mapping)}
        values = {by_filter.get(f) for f in SCALED}
        if len(values) == 1 and by_filter.get(None) in (1, 1.0) and set(by_filter) == {*SCALED, None}:
            value = values.pop()
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    raise EvomergeError(f"{where}.parameters.scale: {scale!r}: a live layer path scales the "
                        f"{' and '.join(SCALED)} tensors by one value and nothing else")


def path_of_recipe(recipe: Mapping[str, Any]) -> list[Slot]:
    """The path a passthrough recipe of one-source slices describes (the inverse of ``path_recipe``)."""
    if recipe.get("merge_method") != "passthrough" or not recipe.get("slices"):
        raise EvomergeError("a layer path is a passthrough recipe with slices")
    path = []
    for i, piece in enumerate(recipe["slices"]):
        sources = piece.get("sources") or []
        if len(sources) != 1:
            raise EvomergeError(f"slices[{i}].sources: a layer path takes one source per slice")
        source = sources[0]
        start, end = source["layer_range"]
        scale = _slice_scale(source, f"slices[{i}].sources[0]")
        path += [Slot(source["model"], layer, scale) for layer in range(start, end)]
    return path


def check_same_shape(configs: Mapping[str, Mapping[str, Any]], where: Mapping[str, str] | None = None) -> None:
    """Sources of one path must share an architecture and every width (their layer counts may differ); the
    error names the differing source, after ``where[source]`` (its config field) when given."""
    (first, reference), *others = configs.items()
    for ref, config in others:
        for key in _SHAPE_KEYS:
            if config.get(key) != reference.get(key):
                field = f"{where[ref]}: " if where and ref in where else ""
                raise EvomergeError(f"{field}{ref}: its {key} is {config.get(key)!r} but {first}'s is "
                                    f"{reference.get(key)!r}; the layers of one path must have one architecture "
                                    "and one width")


def _meta_buffers(model: nn.Module) -> list[str]:
    return [name for name, b in model.named_buffers() if b.is_meta]


class LayerBank:
    """Each source's modules over its tensors as held in memory: nothing is copied where the tensors already
    have the live dtype and device (a source's ``get`` then returns its own tensor)."""

    def __init__(self, sources: Mapping[str, Any], dtype: torch.dtype, device: str = "cpu"):
        self.models: dict[str, nn.Module] = {}
        self.dtype, self.device = dtype, device
        check_same_shape({ref: s.config for ref, s in sources.items()})
        built: dict[int, nn.Module] = {}
        for ref, source in sources.items():
            if id(source) not in built:
                built[id(source)] = self._build(ref, source)
            self.models[ref] = built[id(source)]

    def num_layers(self, ref: str) -> int:
        return len(_decoder(self.models[ref]).layers)

    def _build(self, ref: str, source) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**source.config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        state = {name: source.get(name, dtype=self.dtype, device=self.device) for name in source.names}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        tied = {n for n in missing if config.tie_word_embeddings and n.endswith("lm_head.weight")}
        if unexpected or set(missing) - tied:
            raise EvomergeError(f"{ref}: its tensors do not fit its config.json's {config.model_type} model "
                                f"(missing: {sorted(set(missing) - tied)[:3]}, unexpected: {sorted(unexpected)[:3]})")
        if tied:
            model.tie_weights()
        self._fill_buffers(model, config)
        return model.eval()

    def _fill_buffers(self, model: nn.Module, config) -> None:
        """Non-persistent buffers (rotary frequencies, embedding scales) are computed at construction, which
        ran on the meta device: take them from the same architecture built with one layer and a tiny vocabulary."""
        from transformers import AutoModelForCausalLM

        names = _meta_buffers(model)
        if not names:
            return
        small = copy.deepcopy(config)
        key = layer_count_key(small.to_dict()) or "num_hidden_layers"
        setattr(small, key, 1)
        if isinstance(getattr(small, "layer_types", None), list):
            small.layer_types = small.layer_types[:1]
        small.vocab_size = 8
        donor = dict(AutoModelForCausalLM.from_config(small, dtype=self.dtype).named_buffers())
        for name in names:
            donor_name = _layer_zero(name)
            if donor_name not in donor:
                raise EvomergeError(f"{config.model_type}: cannot compute buffer {name} of a layer path model")
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner).register_buffer(leaf, donor[donor_name].to(self.device), persistent=False)


def _layer_zero(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            parts[i + 1] = "0"
    return ".".join(parts)


def _decoder(model: nn.Module) -> nn.Module:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        raise EvomergeError(f"{type(model).__name__}: no decoder layer list to route")
    return decoder


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object over the same parameters and buffers, with its own submodules, hooks and
    attributes (so a slot's ``layer_idx`` and scale hook stay its own)."""
    clone = copy.copy(module)
    for key, value in list(vars(module).items()):
        if "hook" in key and isinstance(value, dict):
            setattr(clone, key, type(value)())
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    clone._modules = OrderedDict((k, None if v is None else _shallow(v)) for k, v in module._modules.items())
    return clone


def _scale_hook(scale: float):
    def hook(module, args, output):
        return output * scale
    return hook


def _slot_layer(layer: nn.Module, index: int, scale: float, where: str) -> nn.Module:
    clone = _shallow(layer)
    for module in clone.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = index
    if scale != 1.0:
        if any(hasattr(m, n) for m in clone.modules() for n in _POST_NORMS):
            raise EvomergeError(f"{where}: scale {scale}: this architecture normalizes each branch after its "
                                f"output projection ({', '.join(_POST_NORMS)}), which cancels a scale there")
        scaled = 0
        for name, module in clone.named_modules():
            own = [p for p, _ in module.named_parameters(recurse=False)]
            hit = [p for p in own if any(f in f"{name}.{p}" for f in SCALED)]
            if hit and len(hit) != len(own):
                raise EvomergeError(f"{where}: {name} has both scaled and unscaled tensors")
            if hit:
                module.register_forward_hook(_scale_hook(scale))
                scaled += 1
        if not scaled:
            raise EvomergeError(f"{where}: scale {scale}: the layer has no {' or '.join(SCALED)} tensors")
    return clone


def live_model(bank: LayerBank, ref: str) -> nn.Module:
    """A model object to assemble paths into: the source ``ref``'s modules shared, its config its own."""
    model = bank.models[ref]
    live = _shallow(model)
    live.config = copy.deepcopy(model.config)
    _decoder(live).config = live.config
    return live


def assemble(live: nn.Module, bank: LayerBank, path: Sequence[Slot]) -> nn.Module:
    """Point ``live`` (a model of the bank's architecture, changed in place) at the modules of ``path``."""
    if not path:
        raise EvomergeError("a layer path needs at least one layer")
    layers = []
    for i, slot in enumerate(path):
        where = f"slot {i} ({slot.model} layer {slot.layer})"
        if slot.model not in bank.models:
            raise EvomergeError(f"{where}: {slot.model!r} is not a source of the layer path "
                                f"(sources: {', '.join(bank.models)})")
        source_layers = _decoder(bank.models[slot.model]).layers
        if not 0 <= slot.layer < len(source_layers):
            raise EvomergeError(f"{where}: {slot.model} has layers 0–{len(source_layers) - 1}")
        layers.append(_slot_layer(source_layers[slot.layer], i, slot.scale, where))
    first, last = bank.models[path[0].model], bank.models[path[-1].model]
    decoder, first_decoder, last_decoder = _decoder(live), _decoder(first), _decoder(last)
    embedding = first.get_input_embeddings()
    for name, child in last_decoder.named_children():  # final norm, rotary: from the last slot's model
        if name != "layers" and child is not last.get_input_embeddings():
            setattr(decoder, name, child)
    for name, child in first_decoder.named_children():
        if child is embedding:
            setattr(decoder, name, child)
    decoder.layers = nn.ModuleList(layers)
    if live.config.tie_word_embeddings:
        live.set_output_embeddings(_tied_head(last, embedding))
    else:
        live.set_output_embeddings(last.get_output_embeddings())
    _route_config(live.config, [bank.models[s.model].config for s in path], [s.layer for s in path])
    return live


def _tied_head(model: nn.Module, embedding: nn.Module) -> nn.Module:
    """The first slot's embedding as the LM head (a tied model has no head of its own on disk)."""
    head = _shallow(model.get_output_embeddings())
    head._parameters["weight"] = embedding.weight
    return head


def _per_layer_lists(config) -> dict[str, list]:
    """A config's per-layer lists, by the rule of ``architecture.with_layer_count``: a ``layer…`` key whose
    list has one entry per layer (``layer_types``…)."""
    data = config.to_dict()
    count = data.get(layer_count_key(data) or "num_hidden_layers")
    return {k: v for k, v in data.items() if k.startswith("layer") and isinstance(v, list) and len(v) == count}


def _route_config(config, sources: list, layers: list[int]) -> None:
    """The live config's layer count and per-layer lists as the path has them: each slot's entry from its
    own model's list."""
    lists = {id(s): _per_layer_lists(s) for s in sources}
    key = layer_count_key(config.to_dict()) or "num_hidden_layers"
    setattr(config, key, len(layers))
    for name in lists[id(sources[0])]:
        if all(name in lists[id(s)] for s in sources):
            setattr(config, name, [lists[id(s)][name][i] for s, i in zip(sources, layers)])
