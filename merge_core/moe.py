"""Mixture-of-experts assembly (``merge_method: moe``), mergekit-moe's recipe format and arithmetic.

The base model gives everything but the MLPs; each expert gives its MLPs, stacked as the experts of a
sparse block; a router per layer sends a token to the experts whose prompts it resembles. Llama and
Mistral bases give a Mixtral checkpoint, Qwen2 bases a Qwen2-MoE one (as mergekit 0.1.5 does; tensors in
transformers 5's fused expert layout). Router rows, one per expert, come from ``gate_mode``:

- ``hidden`` (or ``hidden_last``): the base model's hidden state at each layer input for the last token of
  each positive prompt, averaged over prompts, minus the same for negative prompts, normalized. Computed
  in bfloat16, left-padded, like mergekit-moe, so routers equal its routers.
- ``hidden_avg``: the same, averaged over all positions instead of the last.
- ``cheap_embed``: token embeddings of the prompts summed and normalized; the same row for every layer.
- ``random`` (standard normal) / ``uniform_random`` (nn.Linear's init): seeded by ``--seed``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from merge_core.architecture import count_layers
from merge_core.checkpoint import (
    CheckpointReader,
    ShardedWriter,
    atomic_output_dir,
    copy_tokenizer_files,
    parse_size,
    resolve_model_path,
)
from merge_core.errors import EvomergeError
from merge_core.recipe import Expert, MoERecipe, model_card
from merge_core.runtime import DTYPES, check_device, check_dtype_name

MIXTRAL_BASES = ("llama", "mistral")
QWEN_BASES = ("qwen2",)
MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------- routers


def _prompt_batch(tokenizer, prompts: list[str]):
    """Left-padded, each prompt after the BOS token, as mergekit-moe tokenizes them."""
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                     add_special_tokens=False)


def _hidden_states(model, batch, last: bool) -> torch.Tensor:
    """(layers, hidden): each layer's input state at the last (or averaged over every) position, prompt-mean."""
    with torch.no_grad():
        states = torch.stack(model(**batch, output_hidden_states=True).hidden_states[:-1])
    states = states[:, :, -1, :] if last else states.sum(dim=2) / states.shape[2]
    return states.sum(dim=1) / states.shape[1]


def _cheap_embedding(embed: torch.Tensor, batch, layers: int) -> torch.Tensor:
    onehot = torch.nn.functional.one_hot(batch["input_ids"], num_classes=embed.shape[0]).float()
    summed = (onehot @ embed.float() * batch["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    return (summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(layers, 1)


def router_weights(recipe: MoERecipe, base_path: Path, base: CheckpointReader, experts: list[Expert],
                   seed: int | None, device: str = "cpu") -> torch.Tensor:
    """(layers, experts, hidden): one router row per expert and layer."""
    layers = count_layers(base.names, base.config, recipe.base_model)
    hidden = base.config["hidden_size"]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    if recipe.gate_mode == "random":
        return torch.randn((layers, len(experts), hidden), generator=generator)
    if recipe.gate_mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        return torch.rand((layers, len(experts), hidden), generator=generator) * 2 * scale - scale
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.bos_token or tokenizer.eos_token
    if recipe.gate_mode == "cheap_embed":
        embed = base.get("model.embed_tokens.weight")

        def represent(prompts):
            return _cheap_embedding(embed, _prompt_batch(tokenizer, prompts), layers)
    else:
        from transformers.utils import logging as hf_logging

        bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one model load: no bar in the merge's output
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16).to(device)
        if bars_were_on:
            hf_logging.enable_progress_bar()

        def represent(prompts):
            batch = _prompt_batch(tokenizer, prompts).to(device)
            return _hidden_states(model, batch, last=recipe.gate_mode != "hidden_avg").cpu()
    rows = []
    for expert in experts:
        row = represent(expert.positive_prompts)
        if expert.negative_prompts:
            row -= represent(expert.negative_prompts)
        row /= row.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        rows.append(row)
    return torch.stack(rows, dim=1)


# --------------------------------------------------------------------------------------------- assembly


def _check_models(recipe: MoERecipe, readers: dict[str, CheckpointReader]) -> str:
    """The output architecture ("mixtral" or "qwen"), after checking every model can be an expert."""
    base_type = readers[recipe.base_model].config.get("model_type")
    for ref, reader in readers.items():
        if reader.config.get("model_type") != base_type:
            raise EvomergeError(f"experts have different architectures: {recipe.base_model} is {base_type}, "
                                f"{ref} is {reader.config.get('model_type')}")
    shapes = {ref: [r.shape(n) for n in r.names if ".mlp." in n] for ref, r in readers.items()}
    for ref, shape in shapes.items():
        if shape != shapes[recipe.base_model]:
            raise EvomergeError(f"expert {ref}: MLP shapes differ from the base {recipe.base_model}'s")
    if recipe.architecture == "mixtral" or (recipe.architecture is None and base_type in MIXTRAL_BASES):
        if base_type not in MIXTRAL_BASES:
            raise EvomergeError(f"base_model {recipe.base_model}: a Mixtral MoE needs a Llama or Mistral base, "
                                f"got {base_type}")
        if recipe.shared_experts:
            raise EvomergeError("shared_experts: Mixtral has no shared expert (use a Qwen2 base or architecture: qwen)")
        return "mixtral"
    if base_type not in MIXTRAL_BASES + QWEN_BASES:
        raise EvomergeError(f"base_model {recipe.base_model}: MoE assembly supports Llama, Mistral and Qwen2 "
                            f"bases, got {base_type}")
    return "qwen"


def _output_config(recipe: MoERecipe, base_config: dict, kind: str, out_dtype: torch.dtype | None) -> dict:
    """The base's config as a Mixtral or Qwen2-MoE config (transformers fills what the MoE adds)."""
    from transformers import MixtralConfig, Qwen2MoeConfig

    fields = {k: v for k, v in base_config.items() if k not in ("architectures", "model_type", "transformers_version")}
    intermediate = base_config["intermediate_size"]
    if kind == "mixtral":
        config = MixtralConfig(**{**fields, "num_local_experts": len(recipe.experts), "sliding_window": None,
                                  "num_experts_per_tok": recipe.experts_per_token})
        config.architectures = ["MixtralForCausalLM"]
    else:
        shared = intermediate if recipe.shared_experts else 0
        config = Qwen2MoeConfig(**{**fields, "num_experts": len(recipe.experts), "decoder_sparse_step": 1,
                                   "num_experts_per_tok": recipe.experts_per_token, "norm_topk_prob": True,
                                   "use_sliding_window": False, "sliding_window": None,
                                   "moe_intermediate_size": intermediate,
                                   "shared_expert_intermediate_size": shared, "mlp_only_layers": []})
        config.architectures = ["Qwen2MoeForCausalLM"]
        config.sliding_window = None
    out = config.to_diff_dict()
    if out_dtype is not None:
        out["dtype"] = str(out_dtype).removeprefix("torch.")
    return out


def _expert_tensor(reader: CheckpointReader, name: str, expert: Expert,
                   generator: torch.Generator | None) -> torch.Tensor:
    tensor = reader.get(name)
    if expert.noise_scale is not None:
        tensor = tensor + torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * expert.noise_scale
    if expert.residual_scale is not None and name.endswith("down_proj.weight"):
        tensor = tensor * expert.residual_scale
    return tensor


def _tensors(recipe: MoERecipe, kind: str, readers: dict[str, CheckpointReader], routers: torch.Tensor,
             shared_routers: torch.Tensor | None, seed: int | None, config: dict):
    """(name, shape, make) for every output tensor: shapes first, so the writer can lay out the shards,
    and each tensor made only when it is written."""
    base = readers[recipe.base_model]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    hidden = config["hidden_size"]
    layers = routers.shape[0]
    for name in base.names:
        if ".mlp." not in name:
            yield name, tuple(base.shape(name)), lambda name=name: base.get(name)
    if kind == "qwen":  # Qwen2-MoE always has attention biases: Llama/Mistral bases get zeros
        head_dim = hidden // config["num_attention_heads"]
        for layer in range(layers):
            for proj, heads in (("q", "num_attention_heads"), ("k", "num_key_value_heads"),
                                ("v", "num_key_value_heads")):
                name = f"model.layers.{layer}.self_attn.{proj}_proj.bias"
                if name not in base.names:
                    width = config[heads] * head_dim
                    yield name, (width,), lambda width=width: torch.zeros(width)
    for layer in range(layers):
        prefix = f"model.layers.{layer}.mlp"

        def expert_part(expert: Expert, part: str, prefix=prefix) -> torch.Tensor:
            return _expert_tensor(readers[expert.source_model], f"{prefix}.{part}.weight", expert, generator)

        up, down = base.shape(f"{prefix}.up_proj.weight"), base.shape(f"{prefix}.down_proj.weight")
        experts = len(recipe.experts)
        yield f"{prefix}.experts.gate_up_proj", (experts, 2 * up[0], up[1]), lambda expert_part=expert_part: (
            torch.stack([torch.cat([expert_part(e, "gate_proj"), expert_part(e, "up_proj")]) for e in recipe.experts]))
        yield f"{prefix}.experts.down_proj", (experts, *down), lambda expert_part=expert_part: (
            torch.stack([expert_part(e, "down_proj") for e in recipe.experts]))
        yield f"{prefix}.gate.weight", (experts, hidden), lambda layer=layer: routers[layer]
        if kind != "qwen":
            continue
        shared = (recipe.shared_experts or [None])[0]
        for part in MLP_PARTS:
            name = f"{prefix}.shared_expert.{part}.weight"
            if shared is None:  # no shared expert: a zero-width one, which adds exactly nothing
                width = (hidden, 0) if part == "down_proj" else (0, hidden)
                yield name, width, lambda width=width: torch.zeros(width)
            else:
                yield name, tuple(base.shape(f"{prefix}.{part}.weight")), (
                    lambda part=part, expert_part=expert_part: expert_part(shared, part))
        yield f"{prefix}.shared_expert_gate.weight", (1, hidden), lambda layer=layer: (
            shared_routers[layer] if shared_routers is not None else torch.zeros(1, hidden))


def merge_moe(recipe: MoERecipe, out_dir: str | Path, *, device: str = "cpu", dtype: str | None = None,
              out_shard_size: str | int = "5GB", seed: int | None = None, copy_tokenizer: bool = True,
              force: bool = False, allow_pickle: bool = False, recipe_dir: Path | None = None) -> Path:
    """Assemble ``recipe``'s MoE checkpoint at ``out_dir``, atomically (options as ``engine.merge``)."""
    check_device(device)
    if dtype is not None:
        check_dtype_name(dtype, "--dtype")
    max_shard = parse_size(out_shard_size)
    noisy = any(e.noise_scale for e in recipe.experts + (recipe.shared_experts or []))
    if seed is None and (noisy or recipe.gate_mode in ("random", "uniform_random")):
        seed = int.from_bytes(os.urandom(4), "little")  # recorded in the model card, so the output can be redone
    with atomic_output_dir(out_dir, force=force) as tmp:
        paths = {ref: resolve_model_path(ref, recipe_dir) for ref in recipe.referenced_models()}
        readers = {ref: CheckpointReader(path, allow_pickle=allow_pickle) for ref, path in paths.items()}
        base = readers[recipe.base_model]
        kind = _check_models(recipe, readers)
        name = dtype or recipe.dtype or base.config.get("dtype") or base.config.get("torch_dtype")
        out_dtype = DTYPES.get(name) if isinstance(name, str) else None
        gated = recipe.experts + (recipe.shared_experts or [])
        rows = router_weights(recipe, paths[recipe.base_model], base, gated, seed, device)
        routers, shared_routers = rows[:, :len(recipe.experts)], rows[:, len(recipe.experts):]
        config = _output_config(recipe, base.config, kind, out_dtype)
        tensors = list(_tensors(recipe, kind, readers, routers, shared_routers if recipe.shared_experts else None,
                                seed, config))
        stored_dtype = out_dtype or base.dtype(base.names[0])
        writer = ShardedWriter(tmp, {n: (shape, stored_dtype) for n, shape, _ in tensors}, max_shard_bytes=max_shard)
        for n, _, make in tensors:
            writer.write(n, make())
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if copy_tokenizer:
            copy_tokenizer_files(paths[recipe.base_model], tmp)
        (tmp / "mergekit_config.yml").write_text(recipe.to_yaml())
        (tmp / "README.md").write_text(model_card(recipe, seed))
    return Path(out_dir)
