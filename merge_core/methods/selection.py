"""Magnitude selection without sorting: the k largest |entries| of a task vector, found by radix selection
over integer keys, with threshold ties going to the lowest flat indices, and the chunk masks that keep
them (TIES and breadcrumbs sparsification)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable

import torch
from torch import Tensor

from merge_core.methods import chunking
from merge_core.methods.registry import TensorContext, cached

KEY_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}

Mask = Callable[[int, Tensor], Tensor]
"""``keep(j, delta)``: chunk j's mask of a task vector, for any chunk in any order (``delta`` is that chunk of
it): 0/1 floats, or all-ones/zero integer bits of the delta's size."""


def magnitude_keys(delta: Tensor) -> Tensor:
    """Flat integer keys ordered like |delta|: the bits of a non-negative float sort as integers (the sign
    bit cleared by an integer and, the same bits as ``abs()`` and cheaper)."""
    size = delta.element_size()
    return delta.reshape(-1).view(KEY_DTYPES[size]).bitwise_and(2**(8 * size - 1) - 1)


def key_counts(keys: Tensor) -> Tensor:
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

    chunking.each_chunk(add, count)
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


def key_finder(ctx: TensorContext, i: int, key_chunk: Callable[[int], Tensor],
               chunk_counts: Callable[[int], Tensor], chunks: list[slice],
               dtype: torch.dtype) -> Callable[[int], tuple[int, int, int]]:
    """How the k-th largest magnitude of model i's task vector is found: from its keys sorted once when
    a search may precompute them, else by radix selection over the chunks (16-bit keys need no pass over
    the chunks beyond the histogram, which a search caches)."""
    bits = 8 * torch.empty(0, dtype=dtype).element_size()

    def key_chunks():
        return (key_chunk(j) for j in range(len(chunks)))

    if ctx.precompute and ctx.cache is not None and bits > 16:
        ordered = cached(ctx, ("sorted_keys", i), lambda: torch.sort(torch.cat(list(key_chunks()))).values)
        return _sorted_key_finder(ordered)
    counts = cached(ctx, ("top_digit_counts", i), lambda: _top_digit_counts(chunk_counts, len(chunks)))
    return partial(_kth_largest_key, key_chunks=key_chunks, top_counts=counts, bits=bits)


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

        chunking.each_chunk(count, batch)
        total = reached + ties.cumsum(0)
        if total[-1] >= rank:
            b = int(torch.searchsorted(total, rank))
            j, rank = order[done + b], rank - int(total[b] - ties[b])
            positions = (key_chunk(j) == key).nonzero().view(-1)
            return chunks[j].start + int(positions[rank - 1 if from_front else -rank]) + 1
        done, reached = done + batch, int(total[-1])
        batch = min(len(order) - done, max(2, batch // 4))


def top_k_selector(k: int, n: int, find_key: Callable[[int], tuple[int, int, int]],
                   key_chunk: Callable[[int], Tensor], chunks: list[slice],
                   dtype: torch.dtype) -> Mask:
    """``keep(j, delta)``: chunk j's mask of the k largest magnitudes, as integer bits (all ones: keep),
    for any chunk in any order; ``find_key(k)`` is ``_kth_largest_key``'s answer. Ties at the threshold
    go to the lowest indices (mergekit's argsort breaks them in an unspecified order, so 16-bit inputs
    can differ there): the index where they stop is found once, from the ties counted per chunk. The mask
    is integer arithmetic on the magnitude keys (subtract, shift the sign down), several times faster
    than float comparisons on CPU."""
    key_dtype = KEY_DTYPES[torch.empty(0, dtype=dtype).element_size()]
    if k <= 0 or k >= n:
        return ConstantMask(k > 0, key_dtype)
    key, left, equal = find_key(k)
    cut = n if left == equal else _index_after_tie(left, equal, key, key_chunk, chunks)
    with_ties, above = (torch.tensor(value, dtype=key_dtype) for value in (key - 1, key))
    return ThresholdMask(key, cut, chunks, with_ties, above)


@dataclass(frozen=True, eq=False)
class ThresholdMask:
    """Chunk j's mask of the magnitude keys above ``key``, or equal to it before flat index ``ties_cut``.

    Its fields are the threshold the compiled kernel applies itself, so it needs no mask in memory."""

    key: int
    ties_cut: int
    chunks: list[slice]
    with_ties: Tensor  # key - 1 and key, as 0-d tensors of the key dtype
    above: Tensor

    def __call__(self, j: int, delta: Tensor) -> Tensor:
        keys = magnitude_keys(delta)
        ties_end = min(max(self.ties_cut - self.chunks[j].start, 0), len(keys))  # ties before it are kept
        torch.sub(self.with_ties, keys[:ties_end], out=keys[:ties_end])  # negative where keys >= key
        torch.sub(self.above, keys[ties_end:], out=keys[ties_end:])  # negative where keys > key
        return keys.bitwise_right_shift_(8 * keys.element_size() - 1)


@dataclass(frozen=True)
class ConstantMask:
    """Every entry kept (``keep``) or none: the top k when k is 0 or the whole tensor."""

    keep: bool
    dtype: torch.dtype  # the integer type of the delta's size

    def __call__(self, j: int, delta: Tensor) -> Tensor:
        return torch.full(delta.shape, -int(self.keep), dtype=self.dtype)
