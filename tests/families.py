"""Small random model families (a base and fine-tunes = base + small deltas) of several architectures.

Used by the merge tests to compare evomerge with mergekit on identical checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96


def _config(arch: str, layers: int):
    common = dict(vocab_size=VOCAB)
    if arch == "llama":
        return LlamaForCausalLM, LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return Qwen2ForCausalLM, Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             tie_word_embeddings=True, **common)
    if arch == "gpt2":
        return GPT2LMHeadModel, GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                                           bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, **common)
    raise ValueError(arch)


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(VOCAB - 2)} | {"<unk>": VOCAB - 2, "</s>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def make_family(root: Path, arch: str = "llama", *, n_finetunes: int = 3, layers: int = 4, seed: int = 0,
                dtype: torch.dtype = torch.float32, delta_scale: float = 0.05) -> dict[str, Path]:
    """Write ``base`` and ``ft1..ftN`` under ``root``; returns name → path. Deterministic in ``seed``."""
    cls, config = _config(arch, layers)
    torch.manual_seed(seed)
    base = cls(config).to(dtype)
    tok = tokenizer()
    paths = {}
    for i in range(n_finetunes + 1):
        name = "base" if i == 0 else f"ft{i}"
        model = base if i == 0 else cls(config).to(dtype)
        if i:
            gen = torch.Generator().manual_seed(seed * 100 + i)
            with torch.no_grad():
                for (_, p), (_, b) in zip(model.named_parameters(), base.named_parameters()):
                    p.copy_(b + delta_scale * torch.randn(b.shape, generator=gen).to(dtype))
        path = root / arch / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths[name] = path
    return paths
