"""Sources held in memory: the search reads each model once and materializes many candidates from it."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_core.errors import EvomergeError

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def reuse_freed_memory() -> None:
    """Have glibc keep freed chunk-sized buffers for reuse instead of handing them back to the kernel: a
    merge allocates and frees the same few-hundred-KB temporaries thousands of times on two threads, and
    glibc's defaults (an adaptive mmap threshold, trimmed thread arenas) return them and fault them in
    again: 5 of 32 CPU-s of a Llama-1B DARE merge here. Buffers over 32 MiB are still mapped and returned.
    Process-wide, once; a no-op off glibc."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # also stops glibc adapting it
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)


class TensorSource:
    """A model's tensors in memory with the same interface as a checkpoint reader (read-only for merges)."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict, path: Path | None = None):
        self.tensors = tensors
        self.config = config
        self.path = path

    @classmethod
    def load(cls, reader, dtype: torch.dtype | None = None, device: str = "cpu") -> "TensorSource":
        return cls({n: reader.get(n, dtype=dtype, device=device) for n in reader.names}, dict(reader.config),
                   reader.path)

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def get(self, name: str, dtype: torch.dtype | None = None, device: str = "cpu") -> torch.Tensor:
        return self.tensors[name].to(device=device, dtype=dtype or self.tensors[name].dtype)


def load_in_memory(sources: dict, dtype: torch.dtype | None = None, device: str = "cpu") -> dict:
    """Every source in memory, each underlying model once: a source layered over another (a LoRA adapter
    over its base, which has ``base`` and ``with_base``) keeps only its own small tensors and reads its
    base's tensors from the one copy, so a search over adapters of one base holds one model, not one each."""
    loaded: dict[int, TensorSource] = {}

    def load(source):
        if hasattr(source, "with_base"):
            return source.with_base(load(source.base), dtype, device)
        if id(source) not in loaded:
            loaded[id(source)] = TensorSource.load(source, dtype=dtype, device=device)
        return loaded[id(source)]

    return {ref: load(source) for ref, source in sources.items()}


GIB = 1 << 30
# What the process needs beyond the live model and copied sources: Python, torch, the evaluator's
# activations and the merge's chunk buffers.
WORKING_BYTES = 2 * GIB


def available_memory() -> int:
    """Bytes the kernel can give this process without swapping (MemAvailable: free memory plus page cache it
    can drop), the figure that says whether anonymous memory will fit."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class MemoryPlan:
    """Where a search's bytes live. Source tensors stored in the search's dtype are memory-mapped: file
    pages the kernel reads on demand and drops under pressure, so sources larger than RAM still work. Those
    in another dtype are converted, which copies them into anonymous memory, as is the live model."""

    live_bytes: int
    copied_bytes: int
    mapped_bytes: int
    available: int
    stored: tuple[str, ...] = ()  # the dtypes the converted tensors are stored in

    @property
    def needed(self) -> int:
        return self.live_bytes + self.copied_bytes + WORKING_BYTES

    def cache_budget(self, cap: int) -> int:
        """Bytes left for the search's task-vector cache: half of what stays available, at most ``cap``."""
        return max(0, min(cap, (self.available - self.needed) // 2))


def plan_memory(readers: dict, base_ref: str, dtype: torch.dtype) -> MemoryPlan:
    """The memory a search over ``readers`` (one per source, the base included) needs before anything is
    loaded: only headers are read. An underlying model shared by several sources (an adapter's base) counts
    once."""
    seen: set[int] = set()
    copied = mapped = 0
    stored_as: set[str] = set()

    def count(reader) -> None:
        nonlocal copied, mapped
        if hasattr(reader, "base"):
            count(reader.base)
            return  # an adapter's own factors are small
        if id(reader) in seen:
            return
        seen.add(id(reader))
        for name in reader.names:
            stored = reader.dtype(name) if hasattr(reader, "dtype") else dtype
            size = math.prod(reader.shape(name)) * dtype.itemsize
            if stored == dtype:
                mapped += size
            else:
                copied += size
                stored_as.add(str(stored).removeprefix("torch."))

    for reader in readers.values():
        count(reader)
    base = readers[base_ref]
    live = sum(math.prod(base.shape(n)) for n in base.names) * dtype.itemsize
    return MemoryPlan(live, copied, mapped, available_memory(), tuple(sorted(stored_as)))


def check_memory(plan: MemoryPlan, dtype_name: str, where: str = "dtype") -> None:
    """One line before anything is loaded when the anonymous memory cannot fit."""
    if plan.needed <= plan.available:
        return
    gib = lambda n: f"{n / GIB:.1f} GiB"  # noqa: E731
    advice = (f"; the sources are stored in {' and '.join(plan.stored)}: with dtype {plan.stored[0]} they would be "
              "memory-mapped, not copied" if plan.stored else "")
    raise EvomergeError(f"{where}: the live model ({gib(plan.live_bytes)}), the sources converted to {dtype_name} "
                        f"({gib(plan.copied_bytes)}) and working memory ({gib(WORKING_BYTES)}) need "
                        f"{gib(plan.needed)}, but {gib(plan.available)} is available{advice}")
