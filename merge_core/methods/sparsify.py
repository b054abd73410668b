"""Sparsification of task vectors: how much of each model's change is kept before the task arithmetic sum.

Magnitude masks (TIES, breadcrumbs) come from ``selection``; this module adds DARE's random masks, DELLA's
magnitude-ranked draws, mergekit's own tie-break order, the rescaling by the kept share, and the per-model
plan the merge loop follows. Sparsification needs whole-tensor facts first (the magnitude threshold, l1
norms, the random masks, drawn model after model like mergekit does); those come from earlier streaming
passes. Only random (or rescaled) masks are stored; task vectors never are.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import partial

import numpy as np
import torch
from torch import Tensor

from merge_core import native
from merge_core.errors import EvomergeError
from merge_core.methods import chunking
from merge_core.methods.registry import float_dtype
from merge_core.methods.selection import KEY_DTYPES, Mask, key_counts, key_finder, magnitude_keys, top_k_selector


class Sparsification(Enum):
    """Which entries of a task vector are kept before the sum (mergekit's ``SparsificationMethod``)."""

    MAGNITUDE = "magnitude"  # TIES: the largest magnitudes
    RANDOM = "random"  # DARE: independent draws
    MAGNITUDE_OUTLIERS = "magnitude_outliers"  # breadcrumbs: the largest, less the very largest (gamma)
    DELLA_MAGPRUNE = "della_magprune"  # DELLA: draws likelier for larger magnitudes

    @property
    def by_magnitude(self) -> bool:
        """Kept by a magnitude threshold: deterministic, found by ``selection`` from histograms and (in a
        search) task vectors that can be cached across densities."""
        return self in (Sparsification.MAGNITUDE, Sparsification.MAGNITUDE_OUTLIERS)

    @property
    def stochastic(self) -> bool:
        """Drawn from the tensor's generator, so the merge depends on the seed."""
        return self in (Sparsification.RANDOM, Sparsification.DELLA_MAGPRUNE)

    @property
    def model_params(self) -> dict[str, float]:
        """The per-model parameters it reads beyond ``weight`` and ``density``, with mergekit's defaults."""
        if self is Sparsification.MAGNITUDE_OUTLIERS:
            return {"gamma": 0.01}
        if self is Sparsification.DELLA_MAGPRUNE:
            return {"epsilon": 0.15}
        return {}


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
    return words.view(KEY_DTYPES[size])[:n].bitwise_right_shift_(1).sub_(cut).bitwise_right_shift_(8 * size - 1)


@dataclass(frozen=True, eq=False)
class SparsifyPlan:
    """How one model's task vector is sparsified: ``keep`` gives each chunk's mask (None: all kept) and
    ``scale`` is the rescale factor (None: none; a float when it may be folded into the model's weight, else
    a 0-d tensor, multiplied as mergekit rounds)."""

    keep: Mask | None = None
    scale: Tensor | float | None = None


@dataclass(frozen=True)
class RandomMask:
    """DARE's mask of chunk j, drawn when the chunk is merged from its own stream, seeded ``seed + j``: all
    ones (keep) where the word is below ``cut`` (see ``_keep_bits``). Its fields are what the compiled
    kernel draws from itself."""

    cut: int
    seed: int
    dtype: torch.dtype

    def __call__(self, j: int, delta: Tensor) -> Tensor:
        return _keep_bits(self.cut, delta.numel(), self.seed + j, self.dtype)


@dataclass(frozen=True, eq=False)
class StoredMasks:
    """Masks made before the merge, one per chunk: DELLA's draws, rescaled magnitude masks (their l1 norms
    needed a pass first) and mergekit's sort order."""

    masks: list[Tensor]

    def __call__(self, j: int, delta: Tensor) -> Tensor:
        return self.masks[j]


@dataclass(frozen=True)
class BandMask:
    """breadcrumbs: the entries ``outer`` keeps (the top n - dropped_small) less those ``inner`` keeps (the
    top n - dropped_small - kept, the very largest)."""

    outer: Mask
    inner: Mask

    def __call__(self, j: int, delta: Tensor) -> Tensor:
        return self.outer(j, delta).bitwise_and_(self.inner(j, delta).bitwise_not_())


def _random_plan(density: float, rescale: bool, generator: torch.Generator | None, dtype: torch.dtype) -> SparsifyPlan:
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
    return SparsifyPlan(RandomMask(cut, seed, dtype), levels / kept if rescale else None)


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


def apply_mask(row: Tensor, mask: Tensor, source: Tensor | None = None) -> None:
    """Zero ``row`` where ``mask`` drops (or write ``source`` masked into it): a 0/1 float mask multiplies,
    an integer bit mask ands its bits."""
    source = row if source is None else source
    if mask.is_floating_point():
        torch.mul(source, mask, out=row)
    else:
        torch.bitwise_and(source.view(mask.dtype), mask, out=row.view(mask.dtype))


def sparsify_plan(tensors, base, i, p, params, ctx, kind: Sparsification | None, chunks,
                  task_vector: Tensor | None = None) -> SparsifyPlan:
    """How model i's task vector is sparsified: the plan's ``keep(j, delta)``, called for chunks in any order,
    gives chunk j's mask (0/1 floats, or all-ones/zero integer bits; or is None), and its ``scale`` the rescale
    factor (or None; a float when it may be folded into the weight).

    Magnitude and random masks are computed on the fly; DELLA's, and rescaled magnitude ones, are made
    first in one pass per model (model after model, so DELLA's draws come in mergekit's order) that also
    sums the l1 norms, and kept in the compute dtype. The magnitude histogram, density-independent, goes
    through ``ctx.cache``, so a search sweeping densities over the same inputs computes it once; so can
    model i's flat ``task_vector``, which then saves a subtraction per pass.
    """
    density = p["density"]
    if kind is None or density >= 1:
        return SparsifyPlan()
    origin, model = tensors[base].reshape(-1), tensors[i].reshape(-1)
    n, dtype = origin.numel(), origin.dtype

    def chunk_delta(c: slice) -> Tensor:
        return model[c] - origin[c] if task_vector is None else task_vector[c]

    def deltas():
        return (chunk_delta(c) for c in chunks)

    if kind.by_magnitude:
        work = dtype

        def key_chunk(j):
            return magnitude_keys(chunk_delta(chunks[j]))

        compiled_counts = native.supports(dtype, origin.device, 1)

        def chunk_counts(j):
            c = chunks[j]
            if not compiled_counts:
                return key_counts(key_chunk(j))
            if task_vector is None:
                return native.magnitude_histogram(origin[c], model[c])
            return native.magnitude_histogram(None, task_vector[c])

        find_key = key_finder(ctx, i, key_chunk, chunk_counts, chunks, dtype)
        select = partial(top_k_selector, n=n, find_key=find_key,
                         key_chunk=key_chunk, chunks=chunks, dtype=dtype)
        if ctx.tie_break == "mergekit":
            keep = _sorted_order_keep(torch.cat(list(deltas())), kind, density, p.get("gamma", 0.0), chunks)
        elif kind is Sparsification.MAGNITUDE:
            keep = select(max(1, int(density * n)))
        else:
            kept = int(density * n)
            dropped_small = max(0, n - kept - int(p["gamma"] * n))
            keep = BandMask(select(n - dropped_small), select(n - dropped_small - kept))
        if not params["rescale"]:
            return SparsifyPlan(keep)
        masks = (keep(j, d) for j, d in enumerate(deltas()))
    elif kind is Sparsification.RANDOM:
        return _random_plan(density, params["rescale"], ctx.generator, dtype)
    else:  # DELLA
        work = _bernoulli_dtype(dtype)
        shape = tensors[base].shape
        rows = (1, n) if len(shape) < 2 else shape
        origin_rows, model_rows = origin.view(rows), model.view(rows)
        step = max(1, chunking.CHUNK * rows[0] // max(n, 1))
        drawn = torch.cat([_della_keep(model_rows[r:r + step] - origin_rows[r:r + step], density,
                                       p["epsilon"], work, ctx.generator).reshape(-1)
                           for r in range(0, rows[0], step)])
        masks = (drawn[c] for c in chunks)
    if not params["rescale"]:
        return SparsifyPlan(StoredMasks(list(masks)))
    stored, before, after = [], 0.0, 0.0
    accumulator = float_dtype(torch.empty(0, dtype=work))
    for mask, delta in zip(masks, deltas()):
        magnitude = delta.to(work, copy=True).abs_()  # the delta may be the cached task vector
        before += magnitude.sum(dtype=accumulator).item()
        apply_mask(magnitude, mask)
        after += magnitude.sum(dtype=accumulator).item()
        stored.append(mask)
    before, after = torch.tensor(before, dtype=work), torch.tensor(after, dtype=work)
    return SparsifyPlan(StoredMasks(stored), None if before < 1e-7 or after < 1e-7 else before / after)


def _sorted_order_keep(delta: Tensor, kind: Sparsification, density: float, gamma: float,
                       chunks: list[slice]) -> StoredMasks:
    """``keep(j, delta)`` for ``tie_break="mergekit"``: the masks of the entries mergekit 0.1.5 keeps on
    CPU, which are positions in the CPU sort of the float32 magnitudes: the first k of the descending sort
    (magnitude), or the ``target`` entries after the ``dropped`` smallest of the ascending one
    (magnitude_outliers). Ties fall where that sort puts them, so the sort must be the same call."""
    n = delta.numel()
    magnitudes = delta.detach().reshape(-1).abs().to("cpu", torch.float32)
    if kind is Sparsification.MAGNITUDE:
        kept = torch.argsort(magnitudes, descending=True)[:max(1, int(density * n))]
    else:
        target = int(density * n)
        dropped = max(0, n - target - int(gamma * n))
        kept = torch.sort(magnitudes, descending=False).indices[dropped:dropped + target]
    key_dtype = KEY_DTYPES[delta.element_size()]
    mask = torch.zeros(n, dtype=key_dtype)
    mask[kept] = -1
    mask = mask.to(delta.device)
    return StoredMasks([mask[c] for c in chunks])


def check_densities(kind: Sparsification | None, model_params, params) -> None:
    for p in model_params:
        if "density" not in p:
            continue
        density = p["density"]
        if not 0 < density <= 1:
            raise EvomergeError(f"density must be in (0, 1], got {density}")
        if kind is Sparsification.DELLA_MAGPRUNE and density < 1:
            epsilon = p["epsilon"]
            if not (0 < density - epsilon and density + epsilon < 1):
                raise EvomergeError(f"della needs density ± epsilon inside (0, 1), got density {density}, "
                                    f"epsilon {epsilon}")
