"""Merge methods: each one a small pure function over the tensors of one output weight.

A method is registered by name with its per-model parameters (``weight``, ``density``…) and its global
parameters (``normalize``, ``t``…), each with its default (``REQUIRED`` when the recipe must give it).
Names, parameters and defaults follow mergekit 0.1.5 so its recipes run unchanged.

Calling convention (``MergeMethod.fn``)::

    fn(tensors, base, model_params, params, ctx) -> Tensor

- ``tensors``: one tensor per input model, in recipe order; the base model's tensor is included (at
  index ``base``) whenever the recipe has a base model.
- ``base``: index of the base model in ``tensors``, or None.
- ``model_params``: one dict of resolved per-model parameters per entry of ``tensors``.
- ``params``: resolved global parameters.
- ``ctx``: the output tensor's name and a seeded ``torch.Generator`` for stochastic methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from merge_core.errors import EvomergeError


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class TensorContext:
    name: str
    generator: torch.Generator | None = None
    is_embedding: bool = False


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[[list[Tensor], int | None, list[dict[str, Any]], dict[str, Any], TensorContext], Tensor]
    model_params: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    requires_base: bool = False
    stochastic: bool = False
    min_models: int = 1
    max_models: int | None = None


METHODS: dict[str, MergeMethod] = {}


def register(name: str, *, model_params=None, params=None, requires_base=False, stochastic=False,
             min_models=1, max_models=None):
    """Decorator: register ``fn`` as merge method ``name``."""

    def wrap(fn):
        METHODS[name] = MergeMethod(name, fn, dict(model_params or {}), dict(params or {}),
                                    requires_base, stochastic, min_models, max_models)
        return fn

    return wrap


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise EvomergeError(f"merge_method: unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


@register("linear", model_params={"weight": REQUIRED}, params={"normalize": True})
def linear(tensors, base, model_params, params, ctx):
    weights = torch.tensor([p["weight"] for p in model_params], dtype=torch.float32)
    stacked = torch.stack([t.float() for t in tensors])
    merged = (weights.view(-1, *[1] * (stacked.dim() - 1)) * stacked).sum(0)
    if params["normalize"]:
        merged = merged / weights.sum()
    return merged
