"""Merge methods: each one a small pure function over the tensors of one output weight.

A method is registered by name with its per-model parameters (``weight``, ``density``…) and its global
parameters (``normalize``, ``t``…), each with its default (``REQUIRED`` when the recipe must give it).
Names, parameters, defaults and arithmetic follow mergekit 0.1.5 so its recipes run unchanged and give
the same numbers.

Calling convention (``MergeMethod.fn``)::

    fn(tensors, base, model_params, params, ctx) -> Tensor

- ``tensors``: one tensor per input model, in recipe order, all in the compute dtype; the base model's
  tensor is included (at index ``base``) whenever the recipe has a base model.
- ``base``: index of the base model in ``tensors``, or None.
- ``model_params``: one dict of resolved per-model parameters per entry of ``tensors``. The base's dict
  is not read unless the method has ``base_is_input`` (mergekit resolves per-model parameters for the
  base only for those methods), so it may be empty.
- ``params``: resolved global parameters.
- ``ctx``: the output tensor's name, a seeded ``torch.Generator`` for stochastic methods, and an
  optional ``cache`` dict for work that a search can reuse across calls on the same inputs.

Dtypes, as in mergekit: the inputs arrive in the compute dtype and the result comes back in that same
dtype. Methods that mergekit runs in float32 (linear, slerp, the norms of karcher) up-cast internally
(float64 stays float64) and round once at the end; all others compute in the given dtype, rounding where
mergekit rounds, so bf16 inputs give mergekit's bf16 arithmetic.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache, partial
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from merge_core import native
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


def _flat_output(ctx: TensorContext, like: Tensor) -> Tensor:
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
    ``check(model_params, params)`` validates parameter values before any tensor work.
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


METHODS: dict[str, MergeMethod] = {}


def register(name: str, *, model_params=None, params=None, requires_base=False, stochastic=False,
             min_models=1, max_models=None, min_non_base=0, max_non_base=None, base_is_input=False,
             check=None):
    """Decorator: register ``fn`` as merge method ``name``."""

    def wrap(fn):
        METHODS[name] = MergeMethod(name, fn, dict(model_params or {}), dict(params or {}), requires_base,
                                    stochastic, min_models, max_models, min_non_base, max_non_base,
                                    base_is_input, check)
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


def _float_dtype(t: Tensor) -> torch.dtype:
    """mergekit's internal precision for methods it up-casts: float32, or float64 for float64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _others(tensors: list[Tensor], base: int | None) -> list[int]:
    return [i for i in range(len(tensors)) if i != base]


def _scalar(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype``, as mergekit gets it by building a tensor of that dtype."""
    return torch.tensor(value, dtype=dtype).item()


# --- interpolations --------------------------------------------------------------------------------


@register("linear", model_params={"weight": REQUIRED}, params={"normalize": True}, base_is_input=True)
def linear(tensors, base, model_params, params, ctx):
    """Weighted average; accumulates in float32 so bf16 inputs are rounded once. Streams over chunks so
    the float32 accumulator stays cache-sized."""
    weights = torch.tensor([p["weight"] for p in model_params], dtype=_float_dtype(tensors[0]))
    flat = [t.reshape(-1) for t in tensors]
    out = _flat_output(ctx, tensors[0])
    chunks = _chunks(out.numel())

    too_large = [p["weight"] for p, w in zip(model_params, weights.tolist()) if not math.isfinite(w)]
    if too_large:
        raise EvomergeError(f"tensor {ctx.name}: linear's weight {too_large[0]:g} is beyond the range of "
                            f"{str(weights.dtype).removeprefix('torch.')} (largest finite "
                            f"{torch.finfo(weights.dtype).max:.4g})")
    divisor = weights.sum() if params["normalize"] else None
    if divisor is not None and not (divisor != 0 and torch.isfinite(divisor)):  # mergekit would write NaN
        raise EvomergeError(f"tensor {ctx.name}: linear's weights ({', '.join(f'{w:g}' for w in weights.tolist())}) "
                            f"sum to {float(divisor):g} in {str(weights.dtype).removeprefix('torch.')}, and "
                            f"normalize: true divides by that sum; give weights with a non-zero finite sum, "
                            f"or normalize: false")
    compiled = (weights.dtype == torch.float32 and native.supports(out.dtype, out.device, 1)
                and all(t.dtype == out.dtype and t.device == out.device for t in flat))

    def merge_chunk(j):
        c = chunks[j]
        if compiled:
            native.weighted_sum([t[c] for t in flat], weights.tolist(), out[c], fused=True,
                                divisor=None if divisor is None else float(divisor))
            return
        merged = torch.zeros(len(range(out.numel())[c]), dtype=weights.dtype)
        for tensor, weight in zip(flat, weights):
            merged.addcmul_(tensor[c], weight)
        if divisor is not None:
            merged.div_(divisor)
        out[c] = merged

    with _one_thread():
        _each_chunk(merge_chunk, len(chunks))
    return out.view(tensors[0].shape)


_SLERP_CHUNK = 1024 * 1024


@register("slerp", params={"t": REQUIRED}, min_models=2, max_models=2)
def slerp(tensors, base, model_params, params, ctx):
    """Spherical interpolation from the base (t=0) to the other model (t=1); lerp when nearly collinear.

    mergekit requires a base model; without one the first model plays the base. Works in float32 chunks
    so scratch memory stays small whatever the tensor size.
    """
    start = 0 if base is None else base
    if not tensors[start].numel():
        return tensors[start]
    with _one_thread():
        return _slerp_flat(tensors[start].reshape(-1), tensors[1 - start].reshape(-1), params["t"],
                           _flat_output(ctx, tensors[start])).view(tensors[start].shape)


def _slerp_flat(a: Tensor, b: Tensor, t: float, out: Tensor) -> Tensor:
    dtype = _float_dtype(a)
    t = _scalar(t, dtype)
    chunks = [slice(i, i + _SLERP_CHUNK) for i in range(0, a.numel(), _SLERP_CHUNK)]
    norms = [None] * len(chunks)  # per-chunk results as Python numbers: small tensors kept between the
    # chunks' large temporaries would fragment malloc's heap and grow it by a chunk each (GBs per tensor)

    def chunk_norms(j):
        norms[j] = [torch.linalg.vector_norm(x[chunks[j]].to(dtype)).item() for x in (a, b)]

    _each_chunk(chunk_norms, len(chunks))
    norm_a, norm_b = (torch.linalg.vector_norm(torch.tensor(column, dtype=dtype)) for column in zip(*norms))
    norm_a = norm_a if norm_a > 1e-8 else torch.ones((), dtype=dtype)
    norm_b = norm_b if norm_b > 1e-8 else torch.ones((), dtype=dtype)
    dots = [None] * len(chunks)

    def chunk_dot(j):
        dots[j] = torch.dot(a[chunks[j]].to(dtype) / norm_a, b[chunks[j]].to(dtype) / norm_b).item()

    _each_chunk(chunk_dot, len(chunks))
    dot = torch.zeros((), dtype=dtype)
    for chunk_dot_value in dots:  # summed in ``dtype``, chunk after chunk
        dot += chunk_dot_value
    dot = dot.clamp(-1, 1)
    if dot.abs() > 0.9995:
        coef_a, coef_b = 1 - t, t
    else:
        theta = torch.acos(dot)
        coef_a = (torch.sin((1 - t) * theta) / torch.sin(theta)).item()
        coef_b = (torch.sin(t * theta) / torch.sin(theta)).item()

    compiled = dtype == torch.float32 and native.supports(a.dtype, a.device, 1) and out.device == a.device

    def chunk_out(j):
        c = chunks[j]
        if compiled:
            native.weighted_sum([a[c], b[c]], [float(coef_a), float(coef_b)], out[c], fused=False)
        else:
            out[c] = torch.add(a[c].to(dtype) * coef_a, b[c].to(dtype) * coef_b)

    _each_chunk(chunk_out, len(chunks))
    return out


def _nuslerp(t: float, v0: Tensor, v1: Tensor, row_wise: bool, flatten: bool) -> Tensor:
    """Slerp of each row (or of the flattened tensors), lerp where a pair is collinear."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(collinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(collinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


@register("nuslerp", model_params={"weight": REQUIRED},
          params={"nuslerp_row_wise": False, "nuslerp_flatten": True},
          min_non_base=2, max_non_base=2)
def nuslerp(tensors, base, model_params, params, ctx):
    """Slerp with t = w₂/(w₁+w₂) between two models, or between their task vectors when there is a base."""
    others = _others(tensors, base)
    if len(others) != 2:  # the planner refuses this first; kept so a direct call is one line too
        raise EvomergeError(f"nuslerp needs exactly 2 models besides the base, got {len(others)}")
    first, second = others
    w1, w2 = model_params[first]["weight"], model_params[second]["weight"]
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    interpolate = partial(_nuslerp, t, row_wise=params["nuslerp_row_wise"], flatten=params["nuslerp_flatten"])
    if base is None:
        return interpolate(tensors[first], tensors[second])
    origin = tensors[base]
    return origin + interpolate(tensors[first] - origin, tensors[second] - origin)


@register("multislerp", model_params={"weight": REQUIRED}, params={"normalize_weights": True, "eps": 1e-8},
          min_non_base=1)
def multislerp(tensors, base, model_params, params, ctx):
    """Barycentric slerp: average on the tangent space at the weighted mean direction, map back.

    With a base, interpolates task vectors. A single model is returned unchanged (as mergekit does).
    """
    others = _others(tensors, base)
    if len(others) == 1:
        return tensors[others[0]]
    eps = params["eps"]
    points = torch.stack([tensors[i] for i in others])
    if base is not None:
        points -= tensors[base]
    flat = points.view(len(others), -1)
    weights = torch.tensor([model_params[i]["weight"] for i in others], dtype=points.dtype)
    if params["normalize_weights"]:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(others) != 2:
            raise EvomergeError(f"multislerp: {ctx.name}: the weighted directions cancel out (antipodal models "
                                "with balancing weights); change the weights")
        result = (points[0] * weights[0] + points[1] * weights[1]).view(points.shape[1:])
        return result if base is None else result + tensors[base]
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * weights).sum()).view(points.shape[1:])
    return result if base is None else result + tensors[base]


@register("karcher", params={"max_iter": 10, "tol": 1e-5}, base_is_input=True)
def karcher(tensors, base, model_params, params, ctx):
    """Equal-weight Karcher (Riemannian) mean of the directions, rescaled by the mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    tol, dtype = params["tol"], _float_dtype(tensors[0])
    alpha = 1.0 / len(tensors)
    norms = [torch.linalg.vector_norm(t.to(dtype)) for t in tensors]
    units = [t / n if n.item() > tol else None for t, n in zip(tensors, norms)]
    valid = [u for u in units if u is not None]
    if not valid:
        return torch.zeros_like(tensors[0])
    mean = sum(u * (1 / len(valid)) for u in valid)
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = valid[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(params["max_iter"]):
        tangent = torch.zeros_like(mean)
        for unit in valid:
            dot = torch.dot(mean.flatten(), unit.flatten()).clamp(-1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() >= tol:
                tangent += (1 / len(valid)) * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    return (sum(alpha * n for n in norms) * mean).to(tensors[0].dtype)


# --- task arithmetic family ------------------------------------------------------------------------
#
# Task arithmetic streams over the flattened tensors in chunks of _CHUNK elements: every chunk runs
# mergekit's formula on a slice, so results are the same while temporaries stay cache-sized (mergekit
# allocates several full-size copies per model). Sparsification needs whole-tensor facts first (the
# magnitude threshold, l1 norms, the random masks, drawn model after model like mergekit does); those
# come from earlier streaming passes. Only random (or rescaled) masks are stored; task vectors never are.

_CHUNK = 1 << 18
_KEY_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _chunks(n: int) -> list[slice]:
    return [slice(start, start + _CHUNK) for start in range(0, n, _CHUNK)]


@contextmanager
def _one_thread():
    """Run chunk-sized ops on one thread: splitting each across threads costs more than it gains, and
    on a busy machine every op would wait for a descheduled worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_WORKERS = 2


@cache
def _helper_threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_WORKERS - 1, "evomerge-chunks", torch.set_num_threads, (1,))


def _each_chunk(work: Callable[[int], None], count: int) -> None:
    """``work(j)`` for every chunk index j, on this thread and ``_WORKERS - 1`` helper threads, each taking
    the next chunk when done with one: chunks are independent, so two cores merge one tensor, and a
    descheduled thread on a busy machine delays only the chunk it holds. ``work`` writes its own results."""
    tickets = iter(range(count))

    def drain():
        for j in tickets:
            work(j)

    running = [_helper_threads().submit(drain) for _ in range(min(_WORKERS, count) - 1)]
    try:
        drain()
    except BaseException:
        for _ in tickets:  # leave the helpers nothing more to take
            pass
        raise
    finally:
        for helper in running:
            helper.result()


def magnitude_keys(delta: Tensor) -> Tensor:
    """Flat integer keys ordered like |delta|: the bits of a non-negative float sort as integers (the sign
    bit cleared by an integer and, the same bits as ``abs()`` and cheaper)."""
    size = delta.element_size()
    return delta.reshape(-1).view(_KEY_DTYPES[size]).bitwise_and(2**(8 * size - 1) - 1)


def _key_counts(keys: Tensor) -> Tensor:
    """``_top_digit_counts`` of one chunk's keys."""
    shift = 8 * keys.element_size() - 16
    return torch.bincount(keys >> shift if shift else keys, minlength=1 << 15)


def _top_digit_counts(chunk_counts: Callable[[int], Tensor], count: int) -> Tensor:
    """Histogram of the top 16 bits of the keys of ``count`` chunks (15 used: the sign bit is 0), counted
    on all workers from each chunk's ``chunk_counts(j)``. Density-independent."""
    counts = torch.zeros(1 << 15, dtype=torch.int64)
    lock = threading.Lock()

    def add(j):
        chunk_counts_j = chunk_counts(j)
        with lock:
            counts.add_(chunk_counts_j)

    _each_chunk(add, count)
    return counts.to(torch.int32)


def _kth_largest_key(k: int, key_chunks: Callable[[], Iterable[Tensor]], top_counts: Tensor, bits: int):
    """Radix selection, 16 bits per round: find the k-th largest key without sorting.

    Each round's histogram locates the digit holding the k-th key; the next round only counts keys with
    that prefix. Returns (key, how many keys equal to it are among the k largest, how many equal it).
    """
    prefix, remaining, counts = 0, k, top_counts.long()
    for shift in range(bits - 16, -1, -16):
        if shift != bits - 16:
            counts = torch.zeros(1 << 16, dtype=torch.int64)
            for keys in key_chunks():
                keys = keys[(keys >> (shift + 16)) == (prefix >> (shift + 16))]
                counts += torch.bincount((keys >> shift) & 0xFFFF, minlength=1 << 16)
        at_or_above = counts.flip(0).cumsum(0).flip(0)
        digit = int((at_or_above >= remaining).nonzero()[-1])
        remaining -= int(at_or_above[digit] - counts[digit])
        prefix |= digit << shift
    return prefix, remaining, int(counts[digit])


def _sorted_key_finder(sorted_keys: Tensor) -> Callable[[int], tuple[int, int, int]]:
    """``_kth_largest_key`` from the keys sorted once (a search's cache): one lookup and two bisections
    per density instead of radix passes over the task vector."""
    n = sorted_keys.numel()

    def find(k: int) -> tuple[int, int, int]:
        key = sorted_keys[n - k:n - k + 1]
        first, after = (int(torch.searchsorted(sorted_keys, key, right=right)) for right in (False, True))
        return int(key), k - (n - after), after - first

    return find


def _index_after_tie(left: int, equal: int, key: int, key_chunk: Callable[[int], Tensor],
                     chunks: list[slice]) -> int:
    """One past the index of the left-th of ``equal`` ties (keys equal to ``key``) in index order. Ties are
    counted chunk by chunk from the nearer end (the one the left-th tie is closer to if ties are spread
    evenly), on all workers, until it is reached: about a quarter of a pass on average instead of one."""
    if len(chunks) == 1:
        return int((key_chunk(0) == key).nonzero()[left - 1]) + 1
    from_front = 2 * left <= equal
    order = list(range(len(chunks))) if from_front else list(range(len(chunks) - 1, -1, -1))
    rank = left if from_front else equal - left + 1  # the tie's rank counted from that end
    done, reached = 0, 0
    batch = min(len(order), len(order) * rank // equal + 2)
    while True:
        ties = torch.zeros(batch, dtype=torch.int64)

        def count(b, js=order[done:done + batch]):
            keys = key_chunk(js[b])
            ties[b] = keys.numel() - torch.count_nonzero(keys.sub_(key))

        _each_chunk(count, batch)
        total = reached + ties.cumsum(0)
        if total[-1] >= rank:
            b = int(torch.searchsorted(total, rank))
            j, rank = order[done + b], rank - int(total[b] - ties[b])
            positions = (key_chunk(j) == key).nonzero().view(-1)
            return chunks[j].start + int(positions[rank - 1 if from_front else -rank]) + 1
        done, reached = done + batch, int(total[-1])
        batch = min(len(order) - done, max(2, batch // 4))


def _top_k_selector(k: int, n: int, find_key: Callable[[int], tuple[int, int, int]],
                    key_chunk: Callable[[int], Tensor], chunks: list[slice],
                    dtype: torch.dtype) -> Callable[[int, Tensor], Tensor]:
    """``keep(j, delta)``: chunk j's mask of the k largest magnitudes, as integer bits (all ones: keep),
    for any chunk in any order; ``find_key(k)`` is ``_kth_largest_key``'s answer. Ties at the threshold
    go to the lowest indices (mergekit's argsort breaks them in an unspecified order, so 16-bit inputs
    can differ there): the index where they stop is found once, from the ties counted per chunk. The mask
    is integer arithmetic on the magnitude keys (subtract, shift the sign down), several times faster
    than float comparisons on CPU."""
    key_dtype = _KEY_DTYPES[torch.empty(0, dtype=dtype).element_size()]
    if k <= 0 or k >= n:
        return lambda j, delta: torch.full(delta.shape, -int(k > 0), dtype=key_dtype)
    key, left, equal = find_key(k)
    cut = n if left == equal else _index_after_tie(left, equal, key, key_chunk, chunks)
    with_ties, above = (torch.tensor(value, dtype=key_dtype) for value in (key - 1, key))
    return partial(_magnitude_keep, key=key, ties_cut=cut, chunks=chunks, with_ties=with_ties, above=above)


def _magnitude_keep(j: int, delta: Tensor, *, key: int, ties_cut: int, chunks: list[slice], with_ties: Tensor,
                    above: Tensor) -> Tensor:
    """Chunk j's mask of the magnitude keys above ``key``, or equal to it before flat index ``ties_cut``."""
    keys = magnitude_keys(delta)
    ties_end = min(max(ties_cut - chunks[j].start, 0), len(keys))  # ties before it are kept
    torch.sub(with_ties, keys[:ties_end], out=keys[:ties_end])  # negative where keys >= key
    torch.sub(above, keys[ties_end:], out=keys[ties_end:])  # negative where keys > key
    return keys.bitwise_right_shift_(8 * keys.element_size() - 1)


def _bernoulli_dtype(dtype: torch.dtype) -> torch.dtype:
    """mergekit's CPU dtype for random masks and their rescaling: bfloat16 stays, all else is float32."""
    return dtype if dtype == torch.bfloat16 else torch.float32


def _draw(probabilities: Tensor, shape, generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    """0/1 draws with per-entry keep probabilities (DELLA), one float32 uniform each."""
    return (probabilities - torch.rand(shape, generator=generator)).sign_().clamp_(min=0).to(dtype)


def _keep_bits(cut: int, n: int, seed: int, dtype: torch.dtype) -> Tensor:
    """n random masks for entries of ``dtype``, in the integer type of its size: all ones (keep) with
    probability (cut + 2^(bits-2)) / 2^(bits-1), else zero (``_random_plan`` makes the cut). Random words
    are cut out of 64-bit draws and compared by integer arithmetic (shift, subtract, shift the sign down),
    several times cheaper than a float32 uniform per entry, a comparison and a conversion, as mergekit
    draws. The words come from numpy's SFC64, which draws them twice as fast as torch's Mersenne Twister,
    without holding the GIL."""
    size = torch.empty(0, dtype=dtype).element_size()
    words = torch.from_numpy(np.random.SFC64(seed).random_raw((n * size + 7) // 8).view(np.int64))
    return words.view(_KEY_DTYPES[size])[:n].bitwise_right_shift_(1).sub_(cut).bitwise_right_shift_(8 * size - 1)


def _random_plan(density: float, rescale: bool, generator: torch.Generator | None, dtype: torch.dtype):
    """DARE: each chunk's mask drawn when the chunk is merged, from its own generator seeded from the
    tensor's (one seed per model, drawn model after model), so chunks can be merged in any order and on
    any thread with the same bytes, and no mask is stored. Rescaling divides by the keep probability,
    which keeps the expected task vector exactly (mergekit divides by the kept share of the l1 norm
    instead, which needs a pass over the tensor and differs from it only by sampling noise). The factor
    is a float: it is folded into the model's weight, one multiplication instead of two."""
    levels = 2**(8 * torch.empty(0, dtype=dtype).element_size() - 1)
    kept = min(max(round(density * levels), 1), levels - 1)
    seed = int(torch.randint(2**62, (), generator=generator))
    cut = kept - levels // 2  # keep when (word >> 1) < cut; no step can overflow
    return partial(_random_keep, cut=cut, seed=seed, dtype=dtype), (levels / kept if rescale else None)


def _random_keep(j: int, delta: Tensor, *, cut: int, seed: int, dtype: torch.dtype) -> Tensor:
    return _keep_bits(cut, delta.numel(), seed + j, dtype)


def _della_keep(delta: Tensor, density: float, epsilon: float, work: torch.dtype,
                generator: torch.Generator | None) -> Tensor:
    """DELLA MagPrune draw: keep probability rises linearly with each entry's magnitude rank along
    dim 1, from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest)."""
    order = torch.argsort(delta.abs(), dim=1)
    positions = torch.arange(delta.shape[1]).view(1, -1, *[1] * (delta.dim() - 2)).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions).to(work) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    position = ((ranks - low) / (high - low)).clamp(0, 1)
    probabilities = (density - epsilon) + position * 2 * epsilon
    return _draw(probabilities.float(), probabilities.shape, generator, work)


def _sparsify_plan(tensors, base, i, p, params, ctx, kind, chunks, task_vector: Tensor | None = None):
    """How model i's task vector is sparsified: ``keep(j, delta)``, called for chunks in any order, gives
    chunk j's mask (0/1 floats, or all-ones/zero integer bits; or is None), and the rescale factor (or None; a
    float when it may be folded into the weight).

    Magnitude and random masks are computed on the fly; DELLA's, and rescaled magnitude ones, are made
    first in one pass per model (model after model, so DELLA's draws come in mergekit's order) that also
    sums the l1 norms, and kept in the compute dtype. The magnitude histogram, density-independent, goes
    through ``ctx.cache``, so a search sweeping densities over the same inputs computes it once; so can
    model i's flat ``task_vector``, which then saves a subtraction per pass.
    """
    density = p["density"]
    if kind is None or density >= 1:
        return None, None
    origin, model = tensors[base].reshape(-1), tensors[i].reshape(-1)
    n, dtype = origin.numel(), origin.dtype

    def chunk_delta(c: slice) -> Tensor:
        return model[c] - origin[c] if task_vector is None else task_vector[c]

    def deltas():
        return (chunk_delta(c) for c in chunks)

    if kind.startswith("magnitude"):
        work = dtype

        def key_chunk(j):
            return magnitude_keys(chunk_delta(chunks[j]))

        compiled_counts = native.supports(dtype, origin.device, 1)

        def chunk_counts(j):
            c = chunks[j]
            if not compiled_counts:
                return _key_counts(key_chunk(j))
            if task_vector is None:
                return native.magnitude_histogram(origin[c], model[c])
            return native.magnitude_histogram(None, task_vector[c])

        find_key = _key_finder(ctx, i, key_chunk, chunk_counts, chunks, dtype)
        select = partial(_top_k_selector, n=n, find_key=find_key,
                         key_chunk=key_chunk, chunks=chunks, dtype=dtype)
        if ctx.tie_break == "mergekit":
            keep = _sorted_order_keep(torch.cat(list(deltas())), kind, density, p.get("gamma", 0.0), chunks)
        elif kind == "magnitude":
            keep = select(max(1, int(density * n)))
        else:
            kept = int(density * n)
            dropped_small = max(0, n - kept - int(p["gamma"] * n))
            outer, inner = select(n - dropped_small), select(n - dropped_small - kept)

            def keep(j, delta):  # the top (n - dropped_small) minus the top (n - dropped_small - kept)
                return outer(j, delta).bitwise_and_(inner(j, delta).bitwise_not_())

        if not params["rescale"]:
            return keep, None
        masks = (keep(j, d) for j, d in enumerate(deltas()))
    elif kind == "random":
        return _random_plan(density, params["rescale"], ctx.generator, dtype)
    else:
        work = _bernoulli_dtype(dtype)
        shape = tensors[base].shape
        rows = (1, n) if len(shape) < 2 else shape
        origin_rows, model_rows = origin.view(rows), model.view(rows)
        step = max(1, _CHUNK * rows[0] // max(n, 1))
        drawn = torch.cat([_della_keep(model_rows[r:r + step] - origin_rows[r:r + step], density,
                                       p["epsilon"], work, ctx.generator).reshape(-1)
                           for r in range(0, rows[0], step)])
        masks = (drawn[c] for c in chunks)
    if not params["rescale"]:
        stored = list(masks)
        return (lambda j, delta: stored[j]), None
    stored, before, after = [], 0.0, 0.0
    accumulator = _float_dtype(torch.empty(0, dtype=work))
    for mask, delta in zip(masks, deltas()):
        magnitude = delta.to(work, copy=True).abs_()  # the delta may be the cached task vector
        before += magnitude.sum(dtype=accumulator).item()
        _apply_mask(magnitude, mask)
        after += magnitude.sum(dtype=accumulator).item()
        stored.append(mask)
    before, after = torch.tensor(before, dtype=work), torch.tensor(after, dtype=work)
    return (lambda j, delta: stored[j]), (None if before < 1e-7 or after < 1e-7 else before / after)


def _sorted_order_keep(delta: Tensor, kind: str, density: float, gamma: float,
                      chunks: list[slice]) -> Callable[[int, Tensor], Tensor]:
    """``keep(j, delta)`` for ``tie_break="mergekit"``: the masks of the entries mergekit 0.1.5 keeps on
    CPU, which are positions in the CPU sort of the float32 magnitudes: the first k of the descending sort
    (magnitude), or the ``target`` entries after the ``dropped`` smallest of the ascending one
    (magnitude_outliers). Ties fall where that sort puts them, so the sort must be the same call."""
    n = delta.numel()
    magnitudes = delta.detach().reshape(-1).abs().to("cpu", torch.float32)
    if kind == "magnitude":
        kept = torch.argsort(magnitudes, descending=True)[:max(1, int(density * n))]
    else:
        target = int(density * n)
        dropped = max(0, n - target - int(gamma * n))
        kept = torch.sort(magnitudes, descending=False).indices[dropped:dropped + target]
    key_dtype = _KEY_DTYPES[delta.element_size()]
    mask = torch.zeros(n, dtype=key_dtype)
    mask[kept] = -1
    mask = mask.to(delta.device)
    return lambda j, _delta: mask[chunks[j]]


def _key_finder(ctx: TensorContext, i: int, key_chunk: Callable[[int], Tensor],
                chunk_counts: Callable[[int], Tensor], chunks: list[slice],
                dtype: torch.dtype) -> Callable[[int], tuple[int, int, int]]:
    """How the k-th largest magnitude of model i's task vector is found: from its keys sorted once when
    a search may precompute them, else by radix selection over the chunks (16-bit keys need no pass over
    the chunks beyond the histogram, which a search caches)."""
    bits = 8 * torch.empty(0, dtype=dtype).element_size()

    def key_chunks():
        return (key_chunk(j) for j in range(len(chunks)))

    if ctx.precompute and ctx.cache is not None and bits > 16:
        ordered = _cached(ctx, ("sorted_keys", i), lambda: torch.sort(torch.cat(list(key_chunks()))).values)
        return _sorted_key_finder(ordered)
    counts = _cached(ctx, ("top_digit_counts", i), lambda: _top_digit_counts(chunk_counts, len(chunks)))
    return partial(_kth_largest_key, key_chunks=key_chunks, top_counts=counts, bits=bits)


def _check_densities(kind: str | None, model_params, params) -> None:
    for p in model_params:
        if "density" not in p:
            continue
        density = p["density"]
        if not 0 < density <= 1:
            raise EvomergeError(f"density must be in (0, 1], got {density}")
        if kind == "della_magprune" and density < 1:
            epsilon = p["epsilon"]
            if not (0 < density - epsilon and density + epsilon < 1):
                raise EvomergeError(f"della needs density ± epsilon inside (0, 1), got density {density}, "
                                    f"epsilon {epsilon}")


def _cached(ctx: TensorContext, key: tuple, compute: Callable[[], Any]) -> Any:
    if ctx.cache is None:
        return compute()
    if key not in ctx.cache:
        ctx.cache[key] = compute()
    return ctx.cache[key]


def _row_sum(rows: Tensor) -> Tensor:
    """``rows.sum(0)`` with the same rounding (16-bit floats accumulate in float32, rounded once), by
    plain additions: reductions over a short leading axis are slow on CPU."""
    if rows.dtype in (torch.bfloat16, torch.float16) and len(rows) > 2:
        total = rows[0].float()
        for row in rows[1:]:
            total += row.float()
        return total.to(rows.dtype)
    total = rows[0] + rows[1] if len(rows) > 1 else rows[0].clone()
    for row in rows[2:]:
        total += row
    return total


def _elect_by_sign_bits(deltas: Tensor, weights: Tensor | None) -> Tensor | None:
    """TIES ``sum`` election on the floats' sign bits (in place), returning the weights of the entries
    kept (the rows of mergekit's ``weights * mask``; None without ``weights``). An entry is kept when its
    sign bit is the weighted sum's and it is not zero. Integer ops are several times faster than ``sign()``
    arithmetic or float comparisons on CPU and give the same bits as mergekit's ``deltas * mask``: a dropped
    entry becomes +0 either way, and a -0 sum of votes counts as positive (adding +0 makes it +0) as its
    ``>= 0`` does."""
    size = deltas.element_size()
    ints, top = _KEY_DTYPES[size], 8 * size - 1
    votes = _row_sum(deltas).add_(0.0).view(ints)
    bits = deltas.view(ints)
    agrees = torch.bitwise_xor(bits, votes.bitwise_not_()).bitwise_right_shift_(top)  # -1 where signs agree
    bits.bitwise_and_(agrees)
    if weights is None:
        return None
    nonzero = torch.bitwise_and(bits, 2**top - 1, out=agrees).neg_().bitwise_right_shift_(top)  # -1 unless ±0
    return nonzero.bitwise_and_(weights.view(ints)).view(deltas.dtype)


def _weight_sum(weights: Tensor) -> Tensor:
    """Task arithmetic's ``normalize`` divisor without consensus: the weights' sum, 1 where it is ~0."""
    divisor = weights.sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    return divisor


def _all_positive(weights: Tensor) -> bool:
    """Whether TIES may clamp its kept-weight divisor to the smallest normal (else zeros become 1)."""
    return bool(weights.min() >= torch.finfo(weights.dtype).tiny)


def _combine(deltas: Tensor, weights: Tensor, consensus: str | None, params) -> Tensor:
    """Merge weighted task-vector rows (consumes ``deltas``): TIES sign election (``sum`` weighs by
    magnitude, ``count`` by votes) keeps only agreeing entries; ``normalize`` divides by the weights that
    were kept (an entry is kept when it agrees and is not zero, as mergekit's ``sign == majority``)."""
    if consensus is None:
        mixed = _row_sum(deltas)
        divisor = _weight_sum(weights)
    elif consensus == "sum":
        kept_weights = _elect_by_sign_bits(deltas, weights if params["normalize"] else None)
        mixed = _row_sum(deltas)
        if params["normalize"]:
            divisor = _row_sum(kept_weights)
            if _all_positive(weights):  # a zero divisor has a zero sum: any positive divisor gives mergekit's 0/1
                divisor.clamp_(min=torch.finfo(divisor.dtype).tiny)
            else:
                divisor[divisor == 0] = 1
    else:
        sign = deltas.sign()
        majority = _row_sum(sign).sign_().add_(0.5).sign_()  # +1 where votes >= 0, else -1
        agrees = sign.mul_(majority).clamp_(min=0)  # 1 where the delta has the majority sign, else 0
        mixed = _row_sum(deltas.mul_(agrees))
        if params["normalize"]:
            divisor = _row_sum(agrees.mul_(weights))
            divisor += 1 - divisor.sign().abs_()  # a zero divisor becomes 1
    if params["normalize"]:
        mixed /= divisor
    if params["lambda"] != 1:
        mixed *= params["lambda"]
    return mixed


def task_arithmetic(tensors, base, model_params, params, ctx, *, sparsification: str | None,
                    consensus: str | None):
    """base + λ·Σ wᵢ·sparsify(modelᵢ − base) [/ Σ wᵢ], with optional TIES sign consensus.

    One function for task_arithmetic, ties, dare_*, breadcrumbs*, della*: they differ only in
    ``sparsification`` (magnitude, random, magnitude_outliers, della_magprune), ``consensus`` (sum,
    count) and defaults. ``ctx.cache`` keeps density-independent work for repeated calls.
    """
    _check_densities(sparsification, model_params, params)
    if len(tensors) == 1:
        return tensors[base]
    with _one_thread():
        return _task_arithmetic_chunks(tensors, base, model_params, params, ctx, sparsification, consensus)


def _task_arithmetic_chunks(tensors, base, model_params, params, ctx, sparsification, consensus):
    origin = tensors[base]
    others = _others(tensors, base)
    chunks = _chunks(origin.numel())
    flat = [t.reshape(-1) for t in tensors]
    stored = _stored_deltas(flat, base, others, ctx, sparsification)
    weights = torch.tensor([model_params[i]["weight"] for i in others], dtype=origin.dtype).view(-1, 1)
    if (stored is not None and _cached(ctx, ("unchanged",), lambda: not bool(stored.any()))
            and bool(weights.isfinite().all())):  # no fine-tune changed it (frozen in a LoRA): the base, + 0
        return torch.add(flat[base], 0.0, out=_flat_output(ctx, origin)).view(origin.shape)
    plans = [_sparsify_plan(tensors, base, i, model_params[i], params, ctx, sparsification, chunks,
                            None if stored is None else stored[row]) for row, i in enumerate(others)]
    out = _flat_output(ctx, origin)

    def merge_chunk(j):
        c = chunks[j]
        start = flat[base][c]
        if stored is None:
            deltas = task_vectors = _chunk_deltas(flat, start, others, c)
        else:  # masked (or copied) out of the cache into the rows
            deltas, task_vectors = torch.empty((len(others), start.numel()), dtype=start.dtype), stored[:, c]
        for row, task_vector, weight, (keep, scale) in zip(deltas, task_vectors, weights.tolist(), plans):
            if keep is not None:
                _apply_mask(row, keep(j, task_vector), task_vector)
            else:
                row.copy_(task_vector)  # free when they are the same memory
            factor = weight[0]
            if isinstance(scale, float):  # random masks: no mergekit rounding to follow
                factor *= scale
            elif scale is not None and scale.dtype == row.dtype:
                row.mul_(scale)
            elif scale is not None:  # float16 inputs: mergekit rescales in float32
                row.copy_(row.to(scale.dtype) * scale)
            row.mul_(factor)
        torch.add(start, _combine(deltas, weights, consensus, params), out=out[c])

    compiled = _compiled_chunk_merger(flat, base, others, stored, chunks, weights, plans, params, sparsification,
                                      consensus, out)
    _each_chunk(compiled or merge_chunk, len(chunks))
    return out.view(origin.shape)


def _compiled_chunk_merger(flat, base, others, stored, chunks, weights, plans, params, sparsification, consensus,
                           out):
    """``merge_chunk`` as one call of the compiled kernel (same bytes), when it covers the case: bf16 or
    float32 on CPU, sum or no consensus, bit masks or random draws (not DELLA's float masks)."""
    origin = flat[base]
    if (consensus not in (None, "sum") or sparsification == "della_magprune"
            or not native.supports(origin.dtype, origin.device, len(others))
            or any(torch.is_tensor(scale) and scale.dtype != origin.dtype for _, scale in plans)):
        return None
    drawn = [isinstance(keep, partial) and keep.func is _random_keep for keep, _ in plans]
    thresholded = [isinstance(keep, partial) and keep.func is _magnitude_keep for keep, _ in plans]
    by_mask = [keep is not None and not random and not threshold
               for (keep, _), random, threshold in zip(plans, drawn, thresholded)]
    weight_values = [w[0] for w in weights.tolist()]
    kernel = native.task_arithmetic(
        origin.dtype, scales=[float(scale) if torch.is_tensor(scale) else None for _, scale in plans],
        factors=[w * scale if isinstance(scale, float) else w for w, (_, scale) in zip(weight_values, plans)],
        weights=weight_values, elect=consensus == "sum", normalize=params["normalize"],
        clamp_tiny=_all_positive(weights), divisor=float(_weight_sum(weights)), lam=params["lambda"])
    masked_deltas = stored is None and any(by_mask)

    def merge_chunk(j):
        c = chunks[j]
        start = flat[base][c]
        if stored is not None:
            inputs = list(stored[:, c])
        elif masked_deltas:  # the magnitude masks need the deltas anyway
            inputs = list(_chunk_deltas(flat, start, others, c))
        else:
            inputs = [flat[i][c] for i in others]
        masks = [keep(j, delta) if mask else None for (keep, _), delta, mask in zip(plans, inputs, by_mask)]
        draws = [(keep.keywords["seed"] + j, keep.keywords["cut"]) if random else None
                 for (keep, _), random in zip(plans, drawn)]
        thresholds = [(keep.keywords["key"], keep.keywords["ties_cut"] - c.start) if threshold else None
                      for (keep, _), threshold in zip(plans, thresholded)]
        kernel(start, inputs, stored is not None or masked_deltas, masks, thresholds, draws, out[c])

    return merge_chunk


def _apply_mask(row: Tensor, mask: Tensor, source: Tensor | None = None) -> None:
    """Zero ``row`` where ``mask`` drops (or write ``source`` masked into it): a 0/1 float mask multiplies,
    an integer bit mask ands its bits."""
    source = row if source is None else source
    if mask.is_floating_point():
        torch.mul(source, mask, out=row)
    else:
        torch.bitwise_and(source.view(mask.dtype), mask, out=row.view(mask.dtype))


def _chunk_deltas(flat: list[Tensor], start: Tensor, others: list[int], c: slice) -> Tensor:
    deltas = torch.empty((len(others), start.numel()), dtype=start.dtype)
    for row, i in zip(deltas, others):
        torch.sub(flat[i][c], start, out=row)
    return deltas


def _stored_deltas(flat: list[Tensor], base: int, others: list[int], ctx: TensorContext,
                   sparsification: str | None) -> Tensor | None:
    """The task vectors as rows, kept in a search's cache when it may precompute them (deterministic
    sparsification only: random masks are drawn chunk by chunk)."""
    if not (ctx.precompute and ctx.cache is not None and sparsification in (None, "magnitude", "magnitude_outliers")):
        return None
    return _cached(ctx, ("deltas",), lambda: torch.stack([flat[i] - flat[base] for i in others]))


_TASK_ARITHMETIC_VARIANTS = {
    # name: (sparsification, consensus, default normalize, default rescale)
    "task_arithmetic": (None, None, False, False),
    "ties": ("magnitude", "sum", True, False),
    "dare_ties": ("random", "sum", False, True),
    "dare_linear": ("random", None, False, True),
    "breadcrumbs": ("magnitude_outliers", None, False, False),
    "breadcrumbs_ties": ("magnitude_outliers", "sum", False, False),
    "della": ("della_magprune", "sum", True, True),
    "della_linear": ("della_magprune", None, False, True),
}

for _name, (_sparsification, _consensus, _normalize, _rescale) in _TASK_ARITHMETIC_VARIANTS.items():
    register(
        _name,
        model_params={"weight": REQUIRED, "density": 1.0,
                      **({"gamma": 0.01} if _sparsification == "magnitude_outliers" else {}),
                      **({"epsilon": 0.15} if _sparsification == "della_magprune" else {})},
        params={"int8_mask": False, "normalize": _normalize, "rescale": _rescale, "lambda": 1.0},
        requires_base=True,
        stochastic=_sparsification in ("random", "della_magprune"),
        check=partial(_check_densities, _sparsification),
    )(partial(task_arithmetic, sparsification=_sparsification, consensus=_consensus))


# --- other base-relative methods -------------------------------------------------------------------


@register("sce", params={"int8_mask": False, "select_topk": 1.0}, requires_base=True)
def sce(tensors, base, model_params, params, ctx):
    """SCE: keep the entries whose task vectors vary most across models, elect signs, weight each model
    by its mean squared delta."""
    origin = tensors[base]
    others = _others(tensors, base)
    if not others:
        return origin
    deltas = torch.stack([tensors[i] - origin for i in others])
    fraction = params["select_topk"]
    if fraction < 1:
        variance = torch.var(deltas, dim=0, unbiased=False)
        k = int(torch.count_nonzero(variance) * fraction) if fraction > 0 else 0
        mask = torch.zeros(variance.numel(), dtype=deltas.dtype)
        if k:
            mask[torch.topk(variance.abs().view(-1), k=k).indices] = 1
        deltas = deltas * mask.view(variance.shape)
    majority = torch.where(deltas.sum(0) >= 0, 1, -1).to(deltas.dtype)
    agrees = deltas.sign() == majority
    energy = deltas.square().reshape(len(others), -1).mean(dim=1)
    total = energy.sum().item()
    weights = torch.ones_like(energy) / len(others) if abs(total) < 1e-6 else energy / total
    weights = weights.view(-1, *[1] * origin.dim()) * agrees
    return origin + (deltas * weights).sum(0) / weights.sum(0).clamp(min=1e-6)


def _ram_vectors(tensors, base, epsilon):
    """Task vectors zeroed below ``epsilon``, with masks of entries changed by one model or by several."""
    deltas = torch.stack([tensors[i] - tensors[base] for i in _others(tensors, base)]).flatten(1)
    changed = deltas.abs() > epsilon
    contributors = changed.sum(dim=0, keepdim=True)
    return deltas * changed, changed, contributors, contributors > 1, contributors == 1


@register("ram", params={"epsilon": 1e-5}, requires_base=True)
def ram(tensors, base, model_params, params, ctx):
    """Reinforced Agent Merging: entries changed by one model take its delta, shared ones the average."""
    if len(tensors) == 1:
        return tensors[base]
    deltas, _, contributors, shared, unique = _ram_vectors(tensors, base, params["epsilon"])
    merged = (deltas * unique + deltas * shared / contributors.clamp(min=1)).sum(dim=0)
    return tensors[base] + merged.reshape(tensors[base].shape)


@register("ramplus_tl", params={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, requires_base=True)
def ramplus_tl(tensors, base, model_params, params, ctx):
    """RAM+ (tensor-local): also boosts each model's unique entries by its shared/unique overlap ratio."""
    if len(tensors) == 1:
        return tensors[base]
    epsilon = params["epsilon"]
    deltas, changed, contributors, shared, unique = _ram_vectors(tensors, base, epsilon)
    ratio = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=epsilon)
    boost = 1 + params["r"] * ratio.clamp(min=0, max=params["alpha"])
    merged = (deltas * unique * boost.unsqueeze(-1) + deltas * shared / contributors.clamp(min=1)).sum(dim=0)
    return tensors[base] + merged.reshape(tensors[base].shape)


@register("model_stock", params={"filter_wise": False}, requires_base=True, min_models=3)
def model_stock(tensors, base, model_params, params, ctx):
    """Model Stock: move from the base toward the models' average by t = k·cosθ / (1 + (k−1)·cosθ),
    cosθ the mean pairwise cosine of the task vectors (per row with ``filter_wise``)."""
    origin = tensors[base]
    def flat(t: torch.Tensor) -> torch.Tensor:
        if not params["filter_wise"]:
            return t.reshape(-1)
        return t.unsqueeze(0) if origin.dim() == 1 else t

    w0 = flat(origin)
    models = [flat(tensors[i]) for i in _others(tensors, base)]
    deltas = [m - w0 for m in models]
    cosines = []
    for i, a in enumerate(deltas):
        for b in deltas[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(models)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0, k * cos / torch.where(singular, 1, denominator))
    return (t * (sum(models) / k) + (1 - t) * w0).reshape(origin.shape)


@register("nearswap", params={"t": REQUIRED}, requires_base=True, min_models=2, max_models=2)
def nearswap(tensors, base, model_params, params, ctx):
    """Take the other model's value where it is within ``t`` of the base, interpolate beyond."""
    a, b = tensors[base], tensors[1 - base]
    weight = (params["t"] / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


_FUSION_SAMPLE = 1_000_000


@register("arcee_fusion", requires_base=True, min_models=2, max_models=2)
def arcee_fusion(tensors, base, model_params, params, ctx):
    """Keep the other model's change only where its importance (|Δ| × KL of the softmaxed rows) is an
    upper outlier: above median + 1.5·IQR, quantiles from a ≤1M sample drawn with ``ctx.generator``."""
    origin, other = tensors[base], tensors[1 - base]
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(origin, dim=-1) + 1e-8
    importance = (other - origin).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    sample = importance.reshape(-1)
    if sample.numel() > _FUSION_SAMPLE:
        sample = sample[torch.randint(sample.numel(), (_FUSION_SAMPLE,), generator=ctx.generator)]
    ordered = torch.sort(sample).values
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return origin + (other - origin) * mask


@register("passthrough", model_params={"scale": None}, max_models=1, base_is_input=True)
def passthrough(tensors, base, model_params, params, ctx):
    """Copy the single input, optionally multiplied by its ``scale``."""
    scale = model_params[0].get("scale")
    return tensors[0] if scale is None else tensors[0] * scale
