"""`merge_method: moe`: the assembled checkpoint equals mergekit-moe's, loads, generates, and refuses bad input."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from merge_core import load_recipe, merge
from merge_core.checkpoint import CheckpointReader
from search.cli import main
from tests.families import make_family


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    paths = {k: str(v) for k, v in make_family(root, "llama").items()}
    paths.update({f"qwen2_{k}": str(v) for k, v in make_family(root, "qwen2").items()})
    return paths


def moe_recipe(fam, prefix: str = "", **extra) -> dict:
    return {"merge_method": "moe", "base_model": fam[f"{prefix}base"], "experts": [
        {"source_model": fam[f"{prefix}ft1"], "positive_prompts": ["t1 t2 t3", "t4 t5"], "negative_prompts": ["t9"]},
        {"source_model": fam[f"{prefix}ft2"], "positive_prompts": ["t10 t11", "t12"]},
        {"source_model": fam[f"{prefix}ft3"], "positive_prompts": ["t20 t21 t22"]}], **extra}


def run_mergekit_moe(recipe: dict, out) -> dict[str, torch.Tensor]:
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    build(MoEMergeConfig.model_validate(recipe), str(out), MergeOptions(quiet=True), device="cpu")
    return load_file(out / "model.safetensors")


def evomerge(capsys, *args) -> tuple[int, str]:
    """(exit code, stderr) of the CLI, run in-process (a subprocess costs seconds of imports)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("gate_mode", ["hidden", "hidden_avg", "cheap_embed"])
def test_mixtral_equals_mergekit_moe(fam, tmp_path, gate_mode):
    pytest.importorskip("mergekit")
    recipe = moe_recipe(fam, gate_mode=gate_mode, dtype="float32")
    expected = run_mergekit_moe(recipe, tmp_path / "mergekit")
    merge(load_recipe(recipe), tmp_path / "evomerge")
    got = load_file(tmp_path / "evomerge" / "model.safetensors")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    config = json.loads((tmp_path / "evomerge" / "config.json").read_text())
    assert config == json.loads((tmp_path / "mergekit" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 3


def test_experts_hold_each_source_mlp(fam, tmp_path):
    merge(load_recipe(moe_recipe(fam, gate_mode="random")), tmp_path / "out", seed=3)
    got = load_file(tmp_path / "out" / "model.safetensors")
    for i, expert in enumerate(("ft1", "ft2", "ft3")):
        source = load_file(f"{fam[expert]}/model.safetensors")
        gate_up = got["model.layers.2.mlp.experts.gate_up_proj"][i]
        assert torch.equal(gate_up, torch.cat([source["model.layers.2.mlp.gate_proj.weight"],
                                               source["model.layers.2.mlp.up_proj.weight"]]))
        assert torch.equal(got["model.layers.2.mlp.experts.down_proj"][i],
                           source["model.layers.2.mlp.down_proj.weight"])
    base = load_file(f"{fam['base']}/model.safetensors")
    assert torch.equal(got["model.layers.1.self_attn.q_proj.weight"], base["model.layers.1.self_attn.q_proj.weight"])
    assert got["model.layers.0.mlp.gate.weight"].shape == (3, 32)


def test_seed_recipe_runs_unchanged_and_generates(fam, tmp_path, capsys):
    recipe = {"merge_method": "moe", "base_model": fam["base"], "dtype": "bfloat16", "experts": [
        {"source_model": fam["ft1"], "positive_prompts": ["math", "calculate"]},
        {"source_model": fam["ft2"], "positive_prompts": ["chat", "conversation"]},
        {"source_model": fam["ft3"], "positive_prompts": ["code", "python"]}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, err = evomerge(capsys, "merge", path, tmp_path / "out", "--quiet")
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "MixtralForCausalLM" and model.dtype == torch.bfloat16
    assert model.config.num_experts_per_tok == 2
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
    assert yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text())["merge_method"] == "moe"


def test_qwen2_base_with_shared_expert_equals_mergekit_moe(fam, tmp_path):
    """Routers are random here (the tiny Qwen2 family's tokenizer does not load as Qwen2's), so every other
    tensor is compared; mergekit writes one tensor per expert, transformers 5's layout fuses them."""
    pytest.importorskip("mergekit")
    recipe = moe_recipe(fam, "qwen2_", gate_mode="random", dtype="float32",
                        shared_experts=[{"source_model": fam["qwen2_base"], "positive_prompts": ["t30"]}])
    expected = run_mergekit_moe(recipe, tmp_path / "mergekit")
    merge(load_recipe(recipe), tmp_path / "evomerge", seed=1)
    got = load_file(tmp_path / "evomerge" / "model.safetensors")
    for layer in range(4):
        prefix = f"model.layers.{layer}.mlp"
        for i in range(3):
            part = {p: expected.pop(f"{prefix}.experts.{i}.{p}_proj.weight") for p in ("gate", "up", "down")}
            assert torch.equal(got[f"{prefix}.experts.gate_up_proj"][i], torch.cat([part["gate"], part["up"]]))
            assert torch.equal(got[f"{prefix}.experts.down_proj"][i], part["down"])
        for router in (f"{prefix}.gate.weight", f"{prefix}.shared_expert_gate.weight"):
            assert got[router].shape == expected.pop(router).shape
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert json.loads((tmp_path / "evomerge" / "config.json").read_text()) == \
        json.loads((tmp_path / "mergekit" / "config.json").read_text())


def test_qwen2_base_without_shared_expert_adds_nothing(fam, tmp_path):
    """mergekit needs a shared expert for Qwen2-MoE; without one evomerge writes a zero-width shared expert.
    Two copies of one expert, whose routing weights sum to 1, must then give exactly that expert's MLP."""
    recipe = {"merge_method": "moe", "base_model": fam["qwen2_base"], "gate_mode": "random", "experts": [
        {"source_model": fam["qwen2_ft2"]}, {"source_model": fam["qwen2_ft2"]}]}
    merge(load_recipe(recipe), tmp_path / "out", seed=1)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.shared_expert_intermediate_size == 0
    expert = AutoModelForCausalLM.from_pretrained(fam["qwen2_ft2"])
    base = AutoModelForCausalLM.from_pretrained(fam["qwen2_base"])
    state = {n: t for n, t in base.state_dict().items() if ".mlp." not in n}
    expert.load_state_dict(state, strict=False)  # the MoE's attention, norms and embeddings are the base's
    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, expert(tokens).logits, atol=1e-5)
    assert model.generate(tokens, max_new_tokens=3, do_sample=False).shape == (1, 7)


def _bad_cases(fam) -> dict[str, tuple[dict, str]]:
    base = moe_recipe(fam)
    return {
        "experts of different architectures": (
            {**base, "experts": [*base["experts"][:2], {"source_model": fam["qwen2_ft1"], "positive_prompts": ["t7"]}]},
            f"experts have different architectures: {fam['base']} is llama, {fam['qwen2_ft1']} is qwen2"),
        "empty prompt list for hidden": (
            {**base, "experts": [*base["experts"][:2], {"source_model": fam["ft3"], "positive_prompts": []}]},
            f"experts[2] ({fam['ft3']}).positive_prompts: gate_mode hidden needs at least one prompt"),
        "same prompts everywhere": (
            {**base, "experts": [{**e, "positive_prompts": ["t1"], "negative_prompts": None} for e in base["experts"]]},
            "every expert has the same prompts"),
        "too many experts per token": ({**base, "experts_per_token": 4}, "experts_per_token: must be between 1 and"),
        "unknown gate mode": ({**base, "gate_mode": "smart"}, "gate_mode"),
        "unknown key": ({**base, "models": []}, "models"),
        "shared expert on Mixtral": ({**base, "shared_experts": [base["experts"][0]]}, "Mixtral has no shared expert"),
    }


def test_bad_input_is_one_line_exit_2(fam, tmp_path, capsys):
    for case, (recipe, expected) in _bad_cases(fam).items():
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        code, err = evomerge(capsys, "merge", path, tmp_path / "out", "--quiet")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, f"{case}: {err}"
        assert expected in lines[0], f"{case}: {lines[0]}"
        assert not (tmp_path / "out").exists(), case


# --- the demo family: routing and skills --------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo_moe(tmp_path_factory):
    """The demo zoo's skills as experts of its base, each routed by its skill's search-split prompts
    (``hidden_avg``: every prompt ends in "=", so last-token gating gives equal router rows at layer 0),
    every expert on every token with its router's weight.

    The experts are the zoo's MoE-ready fine-tunes (LoRA on the MLPs only, trained mixed with the base's
    MLPs): the zoo's own fine-tunes also changed attention, which the MoE takes from the base (measured:
    with perfect routing their rev drops from 1.00 to 0.82; as experts rev 0.33, cap 0.79, nxt 0.40)."""
    from transformers import AutoTokenizer

    from search import demo

    family = demo.ensure_zoo()
    experts = demo.ensure_moe_ready_experts(family)
    recipe = {"merge_method": "moe", "base_model": str(family.base), "gate_mode": "hidden_avg",
              "experts_per_token": len(experts), "experts": [
                  {"source_model": str(expert["path"]),
                   "positive_prompts": [item.prompt for item in demo.eval_items(skill, "search")]}
                  for skill, expert in experts.items()]}
    out = tmp_path_factory.mktemp("zoo_moe") / "moe"
    merge(load_recipe(recipe), out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    return experts, model, AutoTokenizer.from_pretrained(out)


@pytest.mark.slow
def test_moe_ready_experts_differ_from_the_base_only_in_their_mlps(zoo_moe):
    from search import demo

    experts, _, _ = zoo_moe
    base = CheckpointReader(demo.ensure_zoo().base)
    for skill, expert in experts.items():
        reader = CheckpointReader(expert["path"])
        changed = {name for name in base.names if not torch.equal(base.get(name), reader.get(name))}
        assert changed and all(".mlp." in name for name in changed), f"{skill}: {sorted(changed)[:3]}"


@pytest.mark.slow
def test_zoo_moe_routes_each_skill_to_its_expert(zoo_moe):
    """Most test prompts of a skill put the largest routing mass (all tokens, all layers) on its expert.

    Measured: every test prompt of every skill does."""
    from search import demo

    experts, model, tokenizer = zoo_moe
    for expert, skill in enumerate(experts):
        prompts = [item.prompt for item in demo.eval_items(skill, "test")]
        ids = torch.tensor(tokenizer(prompts, add_special_tokens=False)["input_ids"])  # same length: no padding
        with torch.no_grad():
            router_logits = model(input_ids=ids, output_router_logits=True).router_logits
        mass = sum(logits.view(*ids.shape, -1).softmax(-1).sum(1) for logits in router_logits)
        share = (mass.argmax(-1) == expert).float().mean().item()
        assert share >= 0.5, f"{skill}: {share:.2f} of its prompts routed mostly to its expert"


@pytest.mark.slow
def test_zoo_moe_keeps_each_expert_skill(zoo_moe):
    """Each skill's exact match (test split) in the MoE is within 0.1 of its expert's alone.

    Measured: rev 0.92, cap 0.95, nxt 0.93, each expert alone 1.00. (Router weights sum to one per token, so
    each expert gets only part of most tokens: its training for that share is what keeps the skill.)"""
    from search import demo

    experts, model, tokenizer = zoo_moe
    scores = demo.score_skills(model, tokenizer, experts, "test")
    for skill, expert in experts.items():
        alone = expert["scores"][skill]
        assert scores[skill] >= alone - 0.1, f"{skill}: MoE {scores[skill]:.2f} vs expert {alone:.2f}"
