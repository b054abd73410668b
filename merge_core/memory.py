"""Sources held in memory: the search reads each model once and materializes many candidates from it."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path

import torch

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
