"""Small random model families (a base and fine-tunes = base + small deltas) of several architectures.

Used by the merge tests to compare evomerge with mergekit on identical checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
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
    if arch == "gemma":
        return GemmaForCausalLM, GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, **common)
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


def extend_with_perturbed_layers(model_dir: Path, out_dir: Path, *, copies: int = 1, noise: float = 1.0,
                                 seed: int = 0) -> list[int]:
    """Write a model whose layers are each layer of ``model_dir`` followed by ``copies`` perturbed copies of it
    (every weight of a copy plus Gaussian noise of ``noise`` times that tensor's standard deviation). The
    original layers are a known best path through the result; returns their indices in it."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from merge_core.architecture import parse_layer

    config = json.loads((model_dir / "config.json").read_text())
    tensors = load_file(model_dir / "model.safetensors")
    layers = config["num_hidden_layers"]
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    stride = copies + 1
    for name, tensor in tensors.items():
        parsed = parse_layer(name)
        if parsed is None:
            out[name] = tensor
            continue
        prefix, index, rest = parsed.prefix, parsed.index, parsed.rest
        out[f"{prefix}.{index * stride}.{rest}"] = tensor
        for c in range(1, stride):
            spread = tensor.float().std() if tensor.numel() > 1 else tensor.float().abs()
            noisy = tensor.float() + noise * spread * torch.randn(tensor.shape, generator=gen)
            out[f"{prefix}.{index * stride + c}.{rest}"] = noisy.to(tensor.dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, out_dir / "model.safetensors", metadata={"format": "pt"})
    config["num_hidden_layers"] = layers * stride
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = [t for t in config["layer_types"] for _ in range(stride)]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for extra in model_dir.iterdir():
        if extra.name not in ("config.json", "model.safetensors") and extra.is_file():
            shutil.copy(extra, out_dir / extra.name)
    return [i * stride for i in range(layers)]
