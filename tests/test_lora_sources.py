"""LoRA adapters as sources: evomerge merges ``base + adapter`` to mergekit's tensors (mergekit applies the
adapter with PEFT first), searches over adapters in memory, and refuses what it cannot merge in one line."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merge_core import load_recipe, merge
from merge_core.adapters import SourceOpener
from merge_core.errors import EvomergeError
from tests.families import make_family

mergekit = pytest.importorskip("mergekit")
peft = pytest.importorskip("peft")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import MergeOptions, run_merge  # noqa: E402

TASKS = str(Path(__file__).resolve().parent.parent / "configs" / "tasks")
LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def make_adapter(base: Path, out: Path, *, seed: int, r: int = 4, alpha: float = 8, targets=LLAMA_TARGETS,
                 **options) -> Path:
    """A PEFT LoRA adapter of ``base`` with random factors (PEFT starts B at zero, which would be no update);
    ``modules_to_save`` copies get a small random change."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **options)
    peft_model = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "modules_to_save" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    paths = make_family(root, "llama", n_finetunes=1)
    base = paths["base"]
    paths["lora1"] = make_adapter(base, root / "lora1", seed=1)
    paths["lora2"] = make_adapter(base, root / "lora2", seed=2, r=8, alpha=4, targets=["k_proj", "up_proj"])
    paths["rslora"] = make_adapter(base, root / "rslora", seed=3, r=8, alpha=16, use_rslora=True)
    paths["saved"] = make_adapter(base, root / "saved", seed=4, modules_to_save=["lm_head"])
    paths["patterns"] = make_adapter(base, root / "patterns", seed=5, r=4, alpha=8,
                                     rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 32})
    paths["dora"] = make_adapter(base, root / "dora", seed=6, use_dora=True)
    paths["embedding"] = make_adapter(base, root / "embedding", seed=7, targets=["embed_tokens", "q_proj"])
    paths["ft1_lora"] = make_adapter(paths["ft1"], root / "ft1_lora", seed=8)
    gpt2 = make_family(root, "gpt2", n_finetunes=0)["base"]
    paths["gpt2_base"] = gpt2
    paths["gpt2_lora"] = make_adapter(gpt2, root / "gpt2_lora", seed=9, targets=["c_attn", "c_fc"],
                                      fan_in_fan_out=True)
    qwen2 = make_family(root, "qwen2", n_finetunes=0)["base"]
    paths["qwen2_base"] = qwen2
    paths["qwen2_lora_bias"] = make_adapter(qwen2, root / "qwen2_lora_bias", seed=10, targets=["q_proj", "v_proj"],
                                            lora_bias=True)
    return {k: str(v) for k, v in paths.items()}


def load_weights(path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def as_mergekit_reads_it(recipe: dict, adapters: set[str]) -> dict:
    """The recipe with bare adapter sources written ``BASE+ADAPTER``, the only form mergekit reads."""
    def spelled(model: str) -> str:
        return f"{recipe['base_model']}+{model}" if model in adapters else model

    return {**recipe, "models": [{**m, "model": spelled(m["model"])} for m in recipe["models"]]}


def assert_equals_mergekit(recipe: dict, tmp_path, adapters: set[str] = frozenset(), tolerance: float = 1e-6):
    run_merge(MergeConfiguration.model_validate(as_mergekit_reads_it(recipe, adapters)), str(tmp_path / "mergekit"),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                           lora_merge_cache=str(tmp_path / "lora_cache")))
    merge(load_recipe(recipe), tmp_path / "evomerge", copy_tokenizer=False)
    expected, got = load_weights(tmp_path / "mergekit"), load_weights(tmp_path / "evomerge")
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        diff = (got[name].double() - want.double()).abs().max().item()
        assert diff <= tolerance, f"{name} differs by {diff}"
    return got


def test_linear_of_two_base_plus_adapter_sources_equals_mergekit(fam, tmp_path):
    recipe = {"merge_method": "linear", "models": [
        {"model": f"{fam['base']}+{fam['lora1']}", "parameters": {"weight": 0.6}},
        {"model": f"{fam['base']}+{fam['lora2']}", "parameters": {"weight": 0.4}}]}
    assert_equals_mergekit(recipe, tmp_path)


def test_task_arithmetic_of_bare_adapters_over_the_base_model_equals_mergekit(fam, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": fam["base"], "parameters": {"lambda": 0.9},
              "models": [{"model": fam["lora1"], "parameters": {"weight": 0.7}},
                         {"model": fam["lora2"], "parameters": {"weight": 0.5}}]}
    got = assert_equals_mergekit(recipe, tmp_path, {fam["lora1"], fam["lora2"]})
    base = load_weights(fam["base"])
    assert torch.equal(got["model.layers.0.mlp.gate_proj.weight"], base["model.layers.0.mlp.gate_proj.weight"])
    assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_ties_of_two_adapters_equals_mergekit(fam, tmp_path):
    recipe = {"merge_method": "ties", "base_model": fam["base"], "parameters": {"normalize": True},
              "models": [{"model": fam["lora1"], "parameters": {"weight": 0.6, "density": 0.5}},
                         {"model": fam["lora2"], "parameters": {"weight": 0.4, "density": 0.7}}]}
    assert_equals_mergekit(recipe, tmp_path, {fam["lora1"], fam["lora2"]})


def test_rslora_scales_by_alpha_over_the_square_root_of_the_rank_as_mergekit(fam, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": fam["base"],
              "models": [{"model": fam["rslora"], "parameters": {"weight": 1.0}},
                         {"model": fam["ft1"], "parameters": {"weight": 0.5}}]}
    assert_equals_mergekit(recipe, tmp_path, {fam["rslora"]})


def test_modules_to_save_replace_the_base_tensor_as_in_mergekit(fam, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": fam["base"],
              "models": [{"model": fam["saved"], "parameters": {"weight": 1.0}}]}
    got = assert_equals_mergekit(recipe, tmp_path, {fam["saved"]})
    saved = load_file(Path(fam["saved"]) / "adapter_model.safetensors")
    head = next(t for n, t in saved.items() if n.endswith("lm_head.weight"))
    torch.testing.assert_close(got["lm_head.weight"], head, rtol=0, atol=1e-6)


def test_rank_and_alpha_patterns_scale_per_module_as_mergekit(fam, tmp_path):
    recipe = {"merge_method": "linear", "models": [{"model": f"{fam['base']}+{fam['patterns']}",
                                                    "parameters": {"weight": 1.0}}]}
    assert_equals_mergekit(recipe, tmp_path)


def test_fan_in_fan_out_adapter_of_gpt2_conv1d_equals_mergekit(fam, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": fam["gpt2_base"],
              "models": [{"model": fam["gpt2_lora"], "parameters": {"weight": 0.8}}]}
    assert_equals_mergekit(recipe, tmp_path, {fam["gpt2_lora"]})


def test_lora_bias_adds_its_scaled_bias_to_the_base_bias_as_mergekit(fam, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": fam["qwen2_base"],
              "models": [{"model": fam["qwen2_lora_bias"], "parameters": {"weight": 1.0}}]}
    got = assert_equals_mergekit(recipe, tmp_path, {fam["qwen2_lora_bias"]})
    base = load_weights(fam["qwen2_base"])
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.bias"], base["model.layers.0.self_attn.q_proj.bias"])


def test_task_vector_is_b_times_a_times_alpha_over_r(fam):
    source = SourceOpener().open(fam["lora1"], fam["base"])
    factors = load_file(Path(fam["lora1"]) / "adapter_model.safetensors")
    module = "base_model.model.model.layers.2.self_attn.v_proj"
    a, b = factors[f"{module}.lora_A.weight"], factors[f"{module}.lora_B.weight"]
    name = "model.layers.2.self_attn.v_proj.weight"
    delta = source.get(name).double() - load_weights(fam["base"])[name].double()
    torch.testing.assert_close(delta, (b.double() @ a.double()) * (8 / 4), rtol=0, atol=1e-6)
    untouched = "model.layers.2.mlp.up_proj.weight"
    assert torch.equal(source.get(untouched), load_weights(fam["base"])[untouched])


def test_adapter_names_with_the_adapter_name_and_without_peft_prefix_read_the_same(fam, tmp_path):
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "adapter_config.json").write_text((Path(fam["lora1"]) / "adapter_config.json").read_text())
    tensors = load_file(Path(fam["lora1"]) / "adapter_model.safetensors")
    respelled = {n.removeprefix("base_model.model.").replace(".lora_A.", ".lora_A.default.")
                 .replace(".lora_B.", ".lora_B.default."): t for n, t in tensors.items()}
    save_file(respelled, renamed / "adapter_model.safetensors")
    original, spelled = (SourceOpener().open(p, fam["base"]) for p in (fam["lora1"], str(renamed)))
    assert all(torch.equal(original.get(n), spelled.get(n)) for n in original.names)


def test_a_search_over_adapters_validates_and_runs_in_memory(fam, tmp_path):
    from evaluators import Scores, TaskScore
    from search.cli import main
    from search.config import SearchConfig
    from search.loop import open_workbench, search

    class WeightNorm:
        """A cheap stand-in evaluator: the live model's weights must change from candidate to candidate."""

        def __init__(self):
            self.seen: list[float] = []

        def score(self, model, tokenizer) -> Scores:
            value = float(model.model.layers[0].self_attn.q_proj.weight.detach().double().norm())
            self.seen.append(value)
            return Scores({"norm": TaskScore({"score": value}, {"score": True}, {"score": [value]}, 1)}, 0.0)

    data = {"name": "lora", "base_model": fam["base"], "models": [fam["lora1"], fam["rslora"]],
            "method": "task_arithmetic", "parameters": {"weight": {"low": 0.0, "high": 1.0}},
            "tasks": [{"name": "norm"}], "n_trials": 3, "storage": f"sqlite:///{tmp_path}/study.db",
            "output_dir": str(tmp_path)}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({**data, "tasks": [{"name": "zoo_cap"}], "include_path": TASKS}))
    assert main(["validate", str(path)]) == 0
    config = SearchConfig.model_validate(data)
    bench = open_workbench(config, evaluator=WeightNorm())
    assert type(bench.sources[fam["lora1"]]).__name__ == "LoraSource"
    assert bench.sources[fam["lora1"]].base is bench.sources[fam["base"]]  # one copy of the base in memory
    evaluator = WeightNorm()
    study = search(config, evaluator=evaluator, progress=False)
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) >= 3
    assert len(set(evaluator.seen)) > 2  # base, each adapter and the candidates differ
    best = study.best_trial.user_attrs["recipe"]
    # exported as mergekit reads adapters, BASE+ADAPTER, and mergekit merges it to what evomerge merges
    assert {m["model"] for m in best["models"]} == {f"{fam['base']}+{fam['lora1']}", f"{fam['base']}+{fam['rslora']}"}
    recipe = {k: v for k, v in best.items() if k != "evomerge"}
    assert_equals_mergekit(recipe, tmp_path)
    from search.report import write_report  # the report re-materializes exported recipes for the test split

    assert write_report(tmp_path, storage=config.storage_url, evaluator=WeightNorm()).is_file()


def test_a_search_config_refuses_an_adapter_as_base_model_and_an_adapter_of_another_base(fam, tmp_path, capsys):
    from search.cli import main

    def validate(**entries) -> str:
        data = {"name": "lora", "method": "task_arithmetic", "parameters": {"weight": {"low": 0.0, "high": 1.0}},
                "tasks": [{"name": "zoo_cap"}], "include_path": TASKS, "output_dir": str(tmp_path / "run"),
                **entries}
        path = tmp_path / "search.yaml"
        path.write_text(yaml.safe_dump(data))
        assert main(["validate", str(path)]) == 2
        return capsys.readouterr().err.strip()

    assert "base_model: " in validate(base_model=fam["lora1"], models=[fam["lora2"]])
    assert f"trained on {fam['ft1']}" in validate(base_model=fam["base"], models=[fam["lora1"], fam["ft1_lora"]])


def evomerge(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.cli", *map(str, args)], capture_output=True, text=True)


def _bad_cases(fam, tmp_path) -> dict[str, tuple[dict, str]]:
    missing = tmp_path / "missing_weights"
    missing.mkdir()
    (missing / "adapter_config.json").write_text((Path(fam["lora1"]) / "adapter_config.json").read_text())
    other_kind = tmp_path / "ia3"
    other_kind.mkdir()
    config = json.loads((Path(fam["lora1"]) / "adapter_config.json").read_text())
    (other_kind / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))

    anonymous = tmp_path / "gpt2_lora_of_unknown_base"
    shutil.copytree(fam["gpt2_lora"], anonymous)
    config = json.loads((anonymous / "adapter_config.json").read_text())
    (anonymous / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))

    def task_arithmetic(model: str, base: str | None = fam["base"]) -> dict:
        recipe = {"merge_method": "task_arithmetic", "models": [{"model": model, "parameters": {"weight": 1.0}}]}
        return {**recipe, "base_model": base} if base else recipe

    return {
        "adapter of another base": (task_arithmetic(fam["ft1_lora"]), f"trained on {fam['ft1']}"),
        "base+adapter of another base": (task_arithmetic(f"{fam['base']}+{fam['ft1_lora']}", None),
                                         f"but its base here is {fam['base']}"),
        "missing adapter weights": (task_arithmetic(str(missing)), "adapter_model.safetensors not found"),
        "adapter without a base": ({"merge_method": "linear", "models": [
            {"model": fam["lora1"], "parameters": {"weight": 1.0}}]}, "needs a base model"),
        "not an adapter after the +": (task_arithmetic(f"{fam['base']}+{fam['ft1']}", None), "not a LoRA adapter"),
        "DoRA": (task_arithmetic(fam["dora"]), "use_dora"),
        "embedding LoRA": (task_arithmetic(fam["embedding"]), "embedding LoRA"),
        "another PEFT method": (task_arithmetic(str(other_kind)), "peft_type 'IA3'"),
        "adapter of another architecture": (task_arithmetic(str(anonymous)),
                                            "changes transformer.h.0.attn.c_attn.weight, which the base"),
    }


def test_bad_adapters_are_one_line_exit_2_and_write_nothing(fam, tmp_path):
    for case, (recipe, expected) in _bad_cases(fam, tmp_path).items():
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        out = tmp_path / "out"
        result = evomerge("merge", path, out)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, f"{case}: {result.stderr}"
        assert len(lines) == 1 and "Traceback" not in result.stderr, f"{case}: {result.stderr}"
        assert expected in lines[0], f"{case}: {lines[0]}"
        assert not out.exists(), case


def test_the_declared_base_is_compared_only_where_it_can_be(tmp_path):
    from merge_core.adapters import LoraAdapter, check_adapter_base

    snapshot = tmp_path / "hub" / "models--org--llama" / "snapshots" / "0123abc"
    local = tmp_path / "local_llama"
    for directory in (snapshot, local):
        directory.mkdir(parents=True)

    def check(declared: str, base_ref: str, base_path: Path) -> None:
        check_adapter_base(LoraAdapter(tmp_path / "adapter", declared), "adapter", base_ref, base_path)

    check("org/llama", "org/llama", snapshot)
    check("org/llama@main", "org/llama", snapshot)
    check(str(local), str(local), local)
    check("org/llama", str(local), local)  # a hub id against a local directory: cannot be compared
    check(str(local), "org/llama", snapshot)
    check("/home/someone/llama", str(local), local)  # a directory of another machine
    with pytest.raises(EvomergeError, match="trained on org/mistral .* but its base here is org/llama"):
        check("org/mistral", "org/llama", snapshot)
    with pytest.raises(EvomergeError, match=f"trained on {snapshot}"):
        check(str(snapshot), str(local), local)


def test_rslora_scale_is_alpha_over_sqrt_r(fam):
    source = SourceOpener().open(fam["rslora"], fam["base"])
    factors = source.adapter.factors["model.layers.0.self_attn.q_proj.weight"]
    assert factors.scale == pytest.approx(16 / math.sqrt(8))
    patterns = SourceOpener().open(fam["patterns"], fam["base"]).adapter.factors
    assert patterns["model.layers.1.self_attn.q_proj.weight"].scale == 32 / 4
    assert patterns["model.layers.0.self_attn.q_proj.weight"].scale == 8 / 4
    assert patterns["model.layers.0.self_attn.v_proj.weight"].scale == 8 / 2
