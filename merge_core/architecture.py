"""Architecture-agnostic layer bookkeeping, inferred from tensor names and config keys.

No per-architecture tables: a tensor belongs to layer N when its name contains ``<container>.N.`` for a
known container (``model.layers``, ``transformer.h``, ``gpt_neox.layers``, ``encoder.layer``, ``blocks``…).
Other tensors are "pre" (embeddings: they feed the first layer) or "post" (final norm, LM head).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from merge_core.errors import EvomergeError

_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|layer|h|blocks|block))\.(?P<index>\d+)\.(?P<rest>.+)$")
_PRE = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|tok_embeddings)")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_LM_HEAD_NAMES = ("lm_head.weight", "embed_out.weight")
_POSITION = re.compile(r"(position|wpe|token_type)")


@dataclass(frozen=True)
class LayerName:
    prefix: str
    index: int
    rest: str

    def at(self, index: int) -> str:
        return f"{self.prefix}.{index}.{self.rest}"


@lru_cache(maxsize=1 << 16)
def parse_layer(name: str) -> LayerName | None:
    """Cached: planning parses the same few hundred names for every candidate of a search."""
    match = _LAYER.match(name)
    if not match:
        return None
    return LayerName(match["prefix"], int(match["index"]), match["rest"])


def is_pre_weight(name: str) -> bool:
    return bool(_PRE.search(name))


def is_embedding(name: str) -> bool:
    """Tensors indexed by token id: input embeddings and the LM head (not position or token-type tables)."""
    return bool(_PRE.search(name)) and not _POSITION.search(name) or name in _LM_HEAD_NAMES


def layer_count_key(config: dict) -> str | None:
    return next((k for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)


def count_layers(names: list[str], config: dict, model: str) -> int:
    """Number of layers, from tensor names, cross-checked with the config."""
    indices = {p.index for p in map(parse_layer, names) if p}
    key = layer_count_key(config)
    from_names = max(indices) + 1 if indices else 0
    if key is None and not indices:
        raise EvomergeError(f"{model}: cannot infer the layers of this architecture "
                            f"(no '<layers>.N.' tensor names and no num_hidden_layers in config.json)")
    if key is not None and indices and config[key] != from_names:
        raise EvomergeError(f"{model}: config.json says {key}={config[key]} but the weights have {from_names} layers")
    return config[key] if key is not None else from_names


def tied_embedding_name(names: list[str]) -> str | None:
    """The input-embedding tensor an absent LM head is tied to."""
    return next((n for n in names if is_embedding(n) and n not in _LM_HEAD_NAMES and n.endswith("weight")), None)


def with_layer_count(config: dict, source_layers: list[int], num_layers_in: int) -> dict:
    """Output config for a model made of ``source_layers`` (indices into a model with ``num_layers_in``).

    Per-layer lists in the config (e.g. ``layer_types``) follow the layers they describe.
    """
    out = dict(config)
    key = layer_count_key(config)
    if key is None:
        return out
    out[key] = len(source_layers)
    for name, value in config.items():
        if isinstance(value, list) and len(value) == num_layers_in and name.startswith("layer"):
            out[name] = [value[i] for i in source_layers]
    return out
