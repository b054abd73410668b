"""Load a model directory for scoring, refusing clearly what transformers would report as a long traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from merge_core.errors import EvomergeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# lm-eval model_args that say how to load the model: ``load_model`` takes them (the rest go to lm-eval).
LOADER_ARGS = ("dtype", "revision", "trust_remote_code")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def load_model(model_dir: str | Path, device: str = "cpu", dtype: str | None = None, revision: str | None = None,
               trust_remote_code: bool = False) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a Hugging Face checkpoint directory, or a hub id (``NAME@REVISION`` or
    ``revision`` pins it; offline, from the local cache), model in eval mode on ``device`` in ``dtype``
    (default: as stored, ``auto``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merge_core.checkpoint import CheckpointReader, resolve_model_path
    from merge_core.runtime import check_device

    if dtype is not None and str(dtype).removeprefix("torch.") not in DTYPE_NAMES:
        raise EvomergeError(f"model_args.dtype: {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    path = Path(model_dir)
    if not path.is_dir() and not Path(str(model_dir).rsplit("@", 1)[0]).exists():
        ref = str(model_dir) if revision is None else f"{str(model_dir).rsplit('@', 1)[0]}@{revision}"
        try:
            path = resolve_model_path(ref)
        except EvomergeError:
            raise EvomergeError(f"model directory {model_dir} does not exist (nor is it a hub model in the local "
                                "cache)") from None
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
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=str(dtype or "auto").removeprefix("torch."),
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # RuntimeError: e.g. tensor shape mismatches
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EvomergeError(f"cannot load model from {path}: {first}") from exc
    return model.to(device).eval(), tokenizer


def ensure_on_device(model: Any, device: str) -> None:
    """Evaluators take the live model as it is; only move it (in place) when it sits on another device."""
    import torch

    if model.device != torch.device(device) and model.device.type != device:
        model.to(device)
