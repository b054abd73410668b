"""The one place that reaches into vLLM's engine; ``tests/test_vllm_backend.py`` fails loudly when it moves
(on a machine with vLLM installed; without it, the test skips saying so).

vLLM has no public call that replaces a running engine's weights from tensors in this process. ``LLM.
apply_model`` (vLLM ≥ 0.9) runs a function on the model of each worker; with the engine core in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set before the engine is built) the function and the tensors are not
pickled. The model's own ``load_weights`` takes Hugging Face names and does the fusing (q/k/v, gate/up) itself.
Older engines (V0) expose the model through the driver worker instead.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import torch

__all__ = ["IN_PROCESS_ENV", "push_weights", "reset_cache"]

IN_PROCESS_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def in_process() -> None:
    """Keep the engine core in this process (before the engine is built), so weights are handed over by
    reference rather than pickled to a worker process."""
    for key, value in IN_PROCESS_ENV.items():
        os.environ.setdefault(key, value)


def push_weights(llm: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load ``(hf_name, tensor)`` pairs into the engine's model in place."""
    weights = list(weights)

    def load(model: Any) -> None:
        model.load_weights(weights=weights)

    if hasattr(llm, "apply_model"):
        llm.apply_model(load)
        return
    load(llm.llm_engine.model_executor.driver_worker.model_runner.model)  # V0 engines


def reset_cache(llm: Any) -> None:
    """Drop cached prefixes: their key/values were computed with the previous weights."""
    if hasattr(llm, "reset_prefix_cache"):
        llm.reset_prefix_cache()
