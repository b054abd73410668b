"""What a demo family build depends on: the spec (its figures) and the code that trains and measures it.

``ZooSpec.digest()`` names a cached build. It hashes the spec and the source of ``TRAINING_CODE``, the
modules whose every line can change a trained weight or a figure in the manifest:

- ``items``: the skills' item generators, splits and held-out prompts, i.e. the training data;
- ``scoring``: greedy answers and the row encoding both training and measuring use, the scores, the
  task arithmetic and merge grid behind the manifest's figures;
- ``training``: tokenizer, base, pretraining and its competence check, the fine-tunes, the MoE-ready
  experts, the build's order of random draws.

Left out, so that editing them never retrains the family (150-350 CPU-seconds): ``task_files`` (the
lm-eval YAML/JSONL writer, whose files are checked against the committed ones by their own test),
``zoo`` (the cache, the manifest's layout, the summary printer), this module's own plumbing and the CLI.
The spec's fields are hashed by value, so a changed default changes the digest too.

The sources are read from beside this file, not imported: ``training`` imports this module for
``ZooSpec``, and an import back would be a cycle.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from merge_core.errors import EvomergeError

ZOO_SEED_ENV = "EVOMERGE_ZOO_SEED"
TRAINING_CODE = ("items.py", "scoring.py", "training.py")
"""The modules of this package (file names) whose source is part of the digest: see the module docstring."""


def _training_code() -> bytes:
    """The source of ``TRAINING_CODE`` beside this file, each module preceded by its name."""
    directory = Path(__file__).resolve().parent
    return b"".join(name.encode() + b"\0" + (directory / name).read_bytes() for name in TRAINING_CODE)


@dataclass(frozen=True)
class ZooSpec:
    """Everything the build depends on; its hash (with the training code's) names a cached build."""

    seed: int = 0
    skills: tuple[str, ...] = ("rev", "cap", "nxt")
    architecture: str = "llama"  # llama, or gemma: a family of another architecture
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    correct_share: float = 0.35
    base_steps: int = 2000
    base_batch: int = 64
    base_lr: float = 2e-3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    finetune_steps: int = 100
    finetune_batch: int = 64
    finetune_lr: float = 3e-3
    conflicting: tuple[str, ...] = ("rev",)
    replay_share: float = 0.5
    merge_weights: tuple[float, ...] = (0.6, 0.8, 1.0, 1.2, 1.5)

    def digest(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True).encode() + _training_code()
        return hashlib.sha256(payload).hexdigest()[:16]

    @classmethod
    def from_json(cls, data: dict) -> ZooSpec:
        """The spec a manifest recorded (``asdict`` written as JSON: its tuples came back as lists)."""
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})


DEFAULT_SPEC = ZooSpec()


def default_spec() -> ZooSpec:
    """The spec a build uses unless given one: ``DEFAULT_SPEC`` with the seed from ``$EVOMERGE_ZOO_SEED``
    if set, so the test suite and the demo can be run against another family than seed 0's."""
    value = os.environ.get(ZOO_SEED_ENV, "").strip()
    if not value:
        return DEFAULT_SPEC
    try:
        seed = int(value)
    except ValueError:
        raise EvomergeError(f"{ZOO_SEED_ENV}={value!r}: the zoo seed must be a non-negative integer") from None
    if seed < 0:
        raise EvomergeError(f"{ZOO_SEED_ENV}={value!r}: the zoo seed must be a non-negative integer")
    return replace(DEFAULT_SPEC, seed=seed)
