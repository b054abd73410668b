"""Load a model directory for scoring, refusing clearly what transformers would report as a long traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from merge_core.errors import EvomergeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_model(model_dir: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local Hugging Face checkpoint directory, model in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merge_core.checkpoint import CheckpointReader
    from merge_core.runtime import check_device

    path = Path(model_dir)
    if not path.is_dir():
        raise EvomergeError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise EvomergeError(f"{path} has no config.json: not a Hugging Face model directory")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise EvomergeError(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                            f"copy the base model's tokenizer files into it")
    check_device(device)
    if any(path.glob("*.safetensors")):
        CheckpointReader(path)  # its header checks name a truncated or corrupt weights file in one line
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # RuntimeError: e.g. tensor shape mismatches
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EvomergeError(f"cannot load model from {path}: {first}") from exc
    return model.to(device).eval(), tokenizer


def ensure_on_device(model: Any, device: str) -> None:
    """Evaluators take the live model as it is; only move it (in place) when it sits on another device."""
    import torch

    if model.device != torch.device(device) and model.device.type != device:
        model.to(device)
