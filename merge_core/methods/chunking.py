"""Streaming over flat tensors in chunks of ``CHUNK`` elements, on this thread and a helper.

The streaming methods (linear, slerp, the task arithmetic family) run mergekit's formula on one slice at
a time, so results are the same while temporaries stay cache-sized (mergekit allocates several full-size
copies per model). ``CHUNK`` is read when ``chunks()`` is called, so a test may set
``chunking.CHUNK`` to make small tensors span many chunks.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from typing import Callable

import torch

CHUNK = 1 << 18


def chunks(n: int) -> list[slice]:
    return [slice(start, start + CHUNK) for start in range(0, n, CHUNK)]


@contextmanager
def one_thread():
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


def each_chunk(work: Callable[[int], None], count: int) -> None:
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
