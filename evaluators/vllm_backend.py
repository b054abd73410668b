"""Scoring with vLLM: one long-lived engine whose weights are replaced by each candidate's, in place.

The search materializes a candidate into its live Hugging Face model as always (on the GPU); this backend then
hands that model's tensors, by their Hugging Face names, to the engine's model (``_vllm_compat.push_weights``),
drops the engine's prefix cache, and lets lm-eval's vLLM model class answer the same requests the HF backend
answers. Requests, greedy settings, per-document values and ``Scores`` are built by ``LmEvalEvaluator``
itself, so both backends score the same documents the same way; only the forward passes differ.
"""

from __future__ import annotations

from typing import Any, Iterator

from merge_core.errors import EvomergeError

__all__ = ["VllmEngine", "check_vllm", "engine_weights"]


def check_vllm(device: str) -> None:
    """vLLM needs CUDA and its package; one line naming what is missing."""
    from importlib.util import find_spec

    if not device.startswith("cuda"):
        raise EvomergeError(f"evaluator: vllm runs on CUDA; set device: cuda (it is {device})")
    if find_spec("vllm") is None:
        raise EvomergeError("evaluator: vllm: the vllm package is not installed (pip install vllm, on a CUDA machine)")


def engine_weights(model: Any) -> Iterator[tuple[str, Any]]:
    """The live model's tensors as a checkpoint names them: its state dict without the output embedding when it
    is tied to the input one (checkpoints store it once; vLLM ties it itself). No tensor is copied."""
    state = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    embedding = model.get_input_embeddings().weight if tied else None
    for name, tensor in state.items():
        if tied and name.endswith("lm_head.weight") and tensor.data_ptr() == embedding.data_ptr():
            continue
        yield name, tensor.detach()


class VllmEngine:
    """lm-eval's vLLM model over one engine built once from the base model's directory; ``sync`` pushes the
    live model's weights before each candidate is scored."""

    def __init__(self, pretrained: str, *, dtype: str, seed: int = 0, model_args: dict | None = None):
        from evaluators._vllm_compat import in_process

        in_process()
        from lm_eval.models.vllm_causallms import VLLM

        args = {"enable_prefix_caching": False, "gpu_memory_utilization": 0.45, **(model_args or {})}
        self.lm = VLLM(pretrained=pretrained, dtype=dtype, seed=seed, batch_size="auto", **args)

    def sync(self, model: Any) -> Any:
        from evaluators._vllm_compat import push_weights, reset_cache

        push_weights(self.lm.model, engine_weights(model))
        reset_cache(self.lm.model)
        return self.lm
