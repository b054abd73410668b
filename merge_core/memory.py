"""Sources held in memory: the search reads each model once and materializes many candidates from it."""

from __future__ import annotations

from pathlib import Path

import torch


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
