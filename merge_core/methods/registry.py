"""The method registry: what a merge method is, the context it runs in, mergekit's input rules, and the tiny
helpers every method family shares."""

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
    """Per-output-tensor context.

    ``cache``: when the engine passes the same dict for repeated merges of the same input tensors (a
    search trying many densities or weights), task arithmetic keeps its density-independent work there
    instead of recomputing it: the magnitude histogram of each task vector (128 KiB per model), and, if
    ``precompute``, the task vectors themselves and their sorted magnitudes (twice their size).

    ``out``: where the streaming methods may write the result (a live model's parameter, sharing no
    memory with the inputs), which saves allocating a fresh tensor and copying it there.

    ``tie_break``: which task-vector entries whose magnitude equals a TIES or breadcrumbs threshold are
    kept. ``"index"``: the lowest flat indices, a rule any device computes alike. ``"mergekit"``: the ones
    mergekit 0.1.5 keeps on CPU, the first in its (unstable) CPU sort of the float32 magnitudes; the same
    sort is run on CPU whatever the device, so its bytes are mergekit's CPU bytes, at the cost of a full
    sort and an index per entry.
    """

    name: str
    generator: torch.Generator | None = None
    cache: dict | None = None
    precompute: bool = False
    out: Tensor | None = None
    tie_break: str = "index"


TIE_BREAKS = ("index", "mergekit")


def flat_output(ctx: TensorContext, like: Tensor) -> Tensor:
    """A flat tensor shaped and typed like ``like`` for a method to fill: ``ctx.out`` when it fits."""
    out = ctx.out
    if out is not None and out.dtype == like.dtype and out.shape == like.shape and out.is_contiguous():
        return out.view(-1)
    return torch.empty(like.numel(), dtype=like.dtype, device=like.device)


@dataclass(frozen=True)
class MergeMethod:
    """A registered method and mergekit's input rules for it.

    ``min_models``/``max_models`` count every input model including the base (mergekit's min_inputs and
    max_inputs); ``min_non_base``/``max_non_base`` count the others. ``base_is_input``: the method ignores
    which model is the base and treats it as an ordinary input with its own per-model parameters.
    ``check(model_params, params)`` validates parameter values before any tensor work. ``inert``: parameters
    the method accepts (as mergekit does) but whose value changes nothing, so a search does not sample them.
    """

    name: str
    fn: Callable[[list[Tensor], int | None, list[dict[str, Any]], dict[str, Any], TensorContext], Tensor]
    model_params: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    requires_base: bool = False
    stochastic: bool = False
    min_models: int = 1
    max_models: int | None = None
    min_non_base: int = 0
    max_non_base: int | None = None
    base_is_input: bool = False
    check: Callable[[list[dict[str, Any]], dict[str, Any]], None] | None = None
    inert: frozenset[str] = frozenset()


METHODS: dict[str, MergeMethod] = {}


def register(name: str, *, model_params=None, params=None, requires_base=False, stochastic=False,
             min_models=1, max_models=None, min_non_base=0, max_non_base=None, base_is_input=False,
             check=None, inert=()):
    """Decorator: register ``fn`` as merge method ``name``."""

    def wrap(fn):
        METHODS[name] = MergeMethod(name, fn, dict(model_params or {}), dict(params or {}), requires_base,
                                    stochastic, min_models, max_models, min_non_base, max_non_base,
                                    base_is_input, check, frozenset(inert))
        return fn

    return wrap


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise EvomergeError(f"merge_method: unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def _count_phrase(low: int, high: int | None, what: str) -> str:
    if high == low == 1:
        return f"exactly 1 {what.removesuffix('s')}"
    if high == low:
        return f"exactly {low} {what}"
    return f"at least {low} {what}" if high is None else f"{low} to {high} {what}"


def check_inputs(method: MergeMethod, n_models: int, has_base: bool, where: str = "") -> None:
    """Refuse a model list the method cannot merge, as one line (mergekit's InputContract rules).

    The one place the per-method limits registered above (``requires_base``, ``min_models``/``max_models``,
    ``min_non_base``/``max_non_base``) are enforced: the planner calls it for every slice of every merge, so
    ``evomerge merge``, each search candidate and ``evomerge validate`` refuse the same recipes.
    """
    at = f" in {where}" if where else ""
    if method.requires_base and not has_base:
        raise EvomergeError(f"{method.name} needs a base_model{at}")
    if not method.min_models <= n_models <= (method.max_models or n_models):
        raise EvomergeError(f"{method.name} needs {_count_phrase(method.min_models, method.max_models, 'models')}"
                            f" (base included), got {n_models}{at}")
    others = n_models - (has_base and not method.base_is_input)
    if not method.min_non_base <= others <= (method.max_non_base or others):
        raise EvomergeError(f"{method.name} needs {_count_phrase(method.min_non_base, method.max_non_base, 'models')}"
                            f" besides the base, got {others}{at}")


def float_dtype(t: Tensor) -> torch.dtype:
    """mergekit's internal precision for methods it up-casts: float32, or float64 for float64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def non_base(tensors: list[Tensor], base: int | None) -> list[int]:
    """The indices of the inputs other than the base (all of them without one)."""
    return [i for i in range(len(tensors)) if i != base]


def scalar(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype``, as mergekit gets it by building a tensor of that dtype."""
    return torch.tensor(value, dtype=dtype).item()


def cached(ctx: TensorContext, key: tuple, compute: Callable[[], Any]) -> Any:
    if ctx.cache is None:
        return compute()
    if key not in ctx.cache:
        ctx.cache[key] = compute()
    return ctx.cache[key]
