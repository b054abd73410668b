"""The task arithmetic family: task_arithmetic, ties, dare_*, breadcrumbs*, della*, one streaming function.

Task arithmetic streams over the flattened tensors in chunks of ``chunking.CHUNK`` elements: every chunk
runs mergekit's formula on a slice, so results are the same while temporaries stay cache-sized (mergekit
allocates several full-size copies per model). Each model's task vector is sparsified as its plan says
(``sparsify``), the rows are combined with or without TIES sign election, and the compiled kernel
(``merge_core.native``) runs the whole chunk in one pass when it covers the case.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from merge_core import native
from merge_core.methods import chunking
from merge_core.methods.registry import REQUIRED, TensorContext, cached, flat_output, non_base, register
from merge_core.methods.selection import KEY_DTYPES, ThresholdMask
from merge_core.methods.sparsify import RandomMask, Sparsification, apply_mask, check_densities, sparsify_plan


class Consensus(Enum):
    """TIES sign election before the sum (mergekit's ``ConsensusMethod``): entries whose sign is not the
    majority's are dropped."""

    SUM = "sum"  # the sign of the weighted sum: votes weighed by magnitude
    COUNT = "count"  # the sign most models' deltas have


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
    ints, top = KEY_DTYPES[size], 8 * size - 1
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


def combine(deltas: Tensor, weights: Tensor, consensus: Consensus | None, params) -> Tensor:
    """Merge weighted task-vector rows (consumes ``deltas``): TIES sign election (``sum`` weighs by
    magnitude, ``count`` by votes) keeps only agreeing entries; ``normalize`` divides by the weights that
    were kept (an entry is kept when it agrees and is not zero, as mergekit's ``sign == majority``)."""
    if consensus is None:
        mixed = _row_sum(deltas)
        divisor = _weight_sum(weights)
    elif consensus is Consensus.SUM:
        kept_weights = _elect_by_sign_bits(deltas, weights if params["normalize"] else None)
        mixed = _row_sum(deltas)
        if params["normalize"]:
            divisor = _row_sum(kept_weights)
            if _all_positive(weights):  # a zero divisor has a zero sum: any positive divisor gives mergekit's 0/1
                divisor.clamp_(min=torch.finfo(divisor.dtype).tiny)
            else:
                divisor[divisor == 0] = 1
    else:  # Consensus.COUNT
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


def task_arithmetic(tensors, base, model_params, params, ctx, *, sparsification: Sparsification | None,
                    consensus: Consensus | None):
    """base + λ·Σ wᵢ·sparsify(modelᵢ − base) [/ Σ wᵢ], with optional TIES sign consensus.

    One function for task_arithmetic, ties, dare_*, breadcrumbs*, della*: they differ only in
    ``sparsification`` (magnitude, random, magnitude_outliers, della_magprune), ``consensus`` (sum,
    count) and defaults. ``ctx.cache`` keeps density-independent work for repeated calls.
    """
    check_densities(sparsification, model_params, params)
    if len(tensors) == 1:
        return tensors[base]
    with chunking.one_thread():
        return _task_arithmetic_chunks(tensors, base, model_params, params, ctx, sparsification, consensus)


def _task_arithmetic_chunks(tensors, base, model_params, params, ctx, sparsification, consensus):
    origin = tensors[base]
    others = non_base(tensors, base)
    chunks = chunking.chunks(origin.numel())
    flat = [t.reshape(-1) for t in tensors]
    stored = _stored_deltas(flat, base, others, ctx, sparsification)
    weights = torch.tensor([model_params[i]["weight"] for i in others], dtype=origin.dtype).view(-1, 1)
    if (stored is not None and cached(ctx, ("unchanged",), lambda: not bool(stored.any()))
            and bool(weights.isfinite().all())):  # no fine-tune changed it (frozen in a LoRA): the base, + 0
        return torch.add(flat[base], 0.0, out=flat_output(ctx, origin)).view(origin.shape)
    plans = [sparsify_plan(tensors, base, i, model_params[i], params, ctx, sparsification, chunks,
                           None if stored is None else stored[row]) for row, i in enumerate(others)]
    out = flat_output(ctx, origin)

    def merge_chunk(j):
        c = chunks[j]
        start = flat[base][c]
        if stored is None:
            deltas = task_vectors = _chunk_deltas(flat, start, others, c)
        else:  # masked (or copied) out of the cache into the rows
            deltas, task_vectors = torch.empty((len(others), start.numel()), dtype=start.dtype), stored[:, c]
        for row, task_vector, weight, plan in zip(deltas, task_vectors, weights.tolist(), plans):
            if plan.keep is not None:
                apply_mask(row, plan.keep(j, task_vector), task_vector)
            else:
                row.copy_(task_vector)  # free when they are the same memory
            factor, scale = weight[0], plan.scale
            if isinstance(scale, float):  # random masks: no mergekit rounding to follow
                factor *= scale
            elif scale is not None and scale.dtype == row.dtype:
                row.mul_(scale)
            elif scale is not None:  # float16 inputs: mergekit rescales in float32
                row.copy_(row.to(scale.dtype) * scale)
            row.mul_(factor)
        torch.add(start, combine(deltas, weights, consensus, params), out=out[c])

    compiled = _compiled_chunk_merger(flat, base, others, stored, chunks, weights, plans, params, sparsification,
                                      consensus, out)
    chunking.each_chunk(compiled or merge_chunk, len(chunks))
    return out.view(origin.shape)


def _compiled_chunk_merger(flat, base, others, stored, chunks, weights, plans, params, sparsification, consensus,
                           out):
    """``merge_chunk`` as one call of the compiled kernel (same bytes), when it covers the case: bf16 or
    float32 on CPU, sum or no consensus, bit masks or random draws (not DELLA's float masks)."""
    origin = flat[base]
    if (consensus is Consensus.COUNT or sparsification is Sparsification.DELLA_MAGPRUNE
            or not native.supports(origin.dtype, origin.device, len(others))
            or any(torch.is_tensor(plan.scale) and plan.scale.dtype != origin.dtype for plan in plans)):
        return None
    keeps = [plan.keep for plan in plans]  # the kernel draws random masks and applies thresholds itself
    drawn = [keep if isinstance(keep, RandomMask) else None for keep in keeps]
    thresholded = [keep if isinstance(keep, ThresholdMask) else None for keep in keeps]
    by_mask = [None if isinstance(keep, (RandomMask, ThresholdMask)) else keep for keep in keeps]
    scales = [plan.scale for plan in plans]
    weight_values = [w[0] for w in weights.tolist()]
    kernel = native.task_arithmetic(
        origin.dtype, scales=[float(scale) if torch.is_tensor(scale) else None for scale in scales],
        factors=[w * scale if isinstance(scale, float) else w for w, scale in zip(weight_values, scales)],
        weights=weight_values, elect=consensus is Consensus.SUM, normalize=params["normalize"],
        clamp_tiny=_all_positive(weights), divisor=float(_weight_sum(weights)), lam=params["lambda"])
    masked_deltas = stored is None and any(keep is not None for keep in by_mask)

    def merge_chunk(j):
        c = chunks[j]
        start = flat[base][c]
        if stored is not None:
            inputs = list(stored[:, c])
        elif masked_deltas:  # the magnitude masks need the deltas anyway
            inputs = list(_chunk_deltas(flat, start, others, c))
        else:
            inputs = [flat[i][c] for i in others]
        masks = [None if keep is None else keep(j, delta) for keep, delta in zip(by_mask, inputs)]
        draws = [None if keep is None else (keep.seed + j, keep.cut) for keep in drawn]
        thresholds = [None if keep is None else (keep.key, keep.ties_cut - c.start) for keep in thresholded]
        kernel(start, inputs, stored is not None or masked_deltas, masks, thresholds, draws, out[c])

    return merge_chunk


def _chunk_deltas(flat: list[Tensor], start: Tensor, others: list[int], c: slice) -> Tensor:
    deltas = torch.empty((len(others), start.numel()), dtype=start.dtype)
    for row, i in zip(deltas, others):
        torch.sub(flat[i][c], start, out=row)
    return deltas


def _stored_deltas(flat: list[Tensor], base: int, others: list[int], ctx: TensorContext,
                   sparsification: Sparsification | None) -> Tensor | None:
    """The task vectors as rows, kept in a search's cache when it may precompute them (deterministic
    sparsification only: random masks are drawn chunk by chunk)."""
    if not (ctx.precompute and ctx.cache is not None and (sparsification is None or sparsification.by_magnitude)):
        return None
    return cached(ctx, ("deltas",), lambda: torch.stack([flat[i] - flat[base] for i in others]))


@dataclass(frozen=True)
class Variant:
    """One registered member of the family: how it sparsifies, whether it elects signs, and the defaults
    mergekit gives its ``normalize`` and ``rescale``. Registered as the method itself (it is called as one)
    with its ``check``."""

    sparsification: Sparsification | None
    consensus: Consensus | None
    normalize: bool
    rescale: bool

    @property
    def stochastic(self) -> bool:
        return self.sparsification is not None and self.sparsification.stochastic

    @property
    def model_params(self) -> dict:
        extra = {} if self.sparsification is None else self.sparsification.model_params
        return {"weight": REQUIRED, "density": 1.0, **extra}

    def __call__(self, tensors, base, model_params, params, ctx):
        return task_arithmetic(tensors, base, model_params, params, ctx, sparsification=self.sparsification,
                               consensus=self.consensus)

    def check(self, model_params, params) -> None:
        check_densities(self.sparsification, model_params, params)


VARIANTS = {
    "task_arithmetic": Variant(None, None, normalize=False, rescale=False),
    "ties": Variant(Sparsification.MAGNITUDE, Consensus.SUM, normalize=True, rescale=False),
    "dare_ties": Variant(Sparsification.RANDOM, Consensus.SUM, normalize=False, rescale=True),
    "dare_linear": Variant(Sparsification.RANDOM, None, normalize=False, rescale=True),
    "breadcrumbs": Variant(Sparsification.MAGNITUDE_OUTLIERS, None, normalize=False, rescale=False),
    "breadcrumbs_ties": Variant(Sparsification.MAGNITUDE_OUTLIERS, Consensus.SUM, normalize=False, rescale=False),
    "della": Variant(Sparsification.DELLA_MAGPRUNE, Consensus.SUM, normalize=True, rescale=True),
    "della_linear": Variant(Sparsification.DELLA_MAGPRUNE, None, normalize=False, rescale=True),
}

for _name, _variant in VARIANTS.items():
    register(_name, model_params=_variant.model_params,
             params={"int8_mask": False, "normalize": _variant.normalize, "rescale": _variant.rescale, "lambda": 1.0},
             requires_base=True, stochastic=_variant.stochastic, check=_variant.check,
             inert=("density",) if _variant.sparsification is None else ())(_variant)
