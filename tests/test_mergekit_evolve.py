"""mergekit-evolve configs as evomerge searches: each genome option's conversion (checked by hand), the
space it makes against mergekit's own genome (same dimensions; the same merged model for the same genotype),
a 2-trial search through the CLI, and bad input as one line with exit 2."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file

from evaluators import Scores, TaskScore
from merge_core.engine import merge
from merge_core.errors import EvomergeError
from merge_core.recipe import load_recipe
from search.cli import main
from search.config import SearchConfig, check_method_parameters
from search.mergekit_evolve import METHOD_PARAMETERS, convert, is_mergekit_evolve
from search.space import build_recipe, dimensions
from tests.families import make_family

LAYERS = 4


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return {k: str(v) for k, v in make_family(tmp_path_factory.mktemp("evolve"), "llama", n_finetunes=3,
                                              layers=LAYERS).items()}


def evolve_config(genome: dict, **top) -> dict:
    return {"genome": {"models": ["ft1", "ft2"], "merge_method": "ties", "base_model": "base", **genome},
            "tasks": [{"name": "closeness"}], "apply_chat_template": False, **top}


def expected(parameters: dict, **extra) -> dict:
    """The evomerge config of ``evolve_config`` with these parameters and changes, written out in full."""
    out = {"name": "search", "base_model": "base", "models": ["ft1", "ft2"], "method": "ties", "dtype": "bfloat16",
           "parameters": parameters, "fixed": {"normalize": True},
           "tasks": [{"name": "closeness", "weight": 1.0, "metric": "acc"}], "include_path": None, "limit": None,
           "num_fewshot": None, "apply_chat_template": False, "sampler": "cmaes", "n_trials": 100, "timeout": None,
           "seed": 0}
    out.update(extra)
    return {k: v for k, v in out.items() if v != "omit"}


WEIGHT = {"low": 0.0, "high": 1.0}
DENSITY = {"low": 0.01, "high": 1.0}

# case: (genome changes, expected evomerge config); the family has 4 layers
CONVERSIONS = {
    "ties, defaults": ({}, expected({"weight": WEIGHT, "density": DENSITY})),
    "dare_ties": ({"merge_method": "dare_ties"},
                  expected({"weight": WEIGHT, "density": DENSITY}, method="dare_ties")),
    "task_arithmetic: not normalized by default": (
        {"merge_method": "task_arithmetic"},
        expected({"weight": WEIGHT}, method="task_arithmetic", fixed={"normalize": False})),
    "linear: normalized, no base given": (
        {"merge_method": "linear", "base_model": None},
        expected({"weight": WEIGHT}, method="linear", base_model="ft1")),
    "linear with a base: the base is the search's reference, not an input": (
        {"merge_method": "linear"}, expected({"weight": WEIGHT}, method="linear")),
    "slerp: t from the first model to the second": (
        {"merge_method": "slerp", "base_model": None},
        expected({"t": {"low": 0.0, "high": 1.0}}, method="slerp", base_model="ft1", models=["ft2"],
                 fixed="omit")),
    "slerp with its base_model among the models": (
        {"merge_method": "slerp", "base_model": "ft2"},
        expected({"t": {"low": 0.0, "high": 1.0}}, method="slerp", base_model="ft2", models=["ft1"],
                 fixed="omit")),
    "normalize false": ({"normalize": False},
                        expected({"weight": WEIGHT, "density": DENSITY}, fixed={"normalize": False})),
    "normalize true on task_arithmetic": (
        {"merge_method": "task_arithmetic", "normalize": True},
        expected({"weight": WEIGHT}, method="task_arithmetic")),
    "allow_negative_weights": ({"allow_negative_weights": True},
                               expected({"weight": {"low": -1.0, "high": 1.0}, "density": DENSITY})),
    "layer_granularity 2: blocks of 2 layers": (
        {"layer_granularity": 2},
        expected({"weight": {**WEIGHT, "granularity": "blocks"}, "density": {**DENSITY, "granularity": "blocks"}},
                 block_size=2)),
    "layer_granularity of all layers: one block, global": (
        {"layer_granularity": 4}, expected({"weight": WEIGHT, "density": DENSITY})),
    "slerp with layer_granularity 1": (
        {"merge_method": "slerp", "base_model": None, "layer_granularity": 1},
        expected({"t": {"low": 0.0, "high": 1.0, "granularity": "blocks"}}, method="slerp", base_model="ft1",
                 models=["ft2"], fixed="omit", block_size=1)),
    "filters: one group each, plus the rest": (
        {"filters": ["self_attn", "mlp"]},
        expected({"weight": {**WEIGHT, "granularity": "groups", "groups": ["self_attn", "mlp"]},
                  "density": {**DENSITY, "granularity": "groups", "groups": ["self_attn", "mlp"]}})),
    "smooth with layer_granularity 1: a curve of 4 points": (
        {"smooth": True, "layer_granularity": 1},
        expected({"weight": {**WEIGHT, "granularity": "curve", "points": 4},
                  "density": {**DENSITY, "granularity": "curve", "points": 4}})),
    "smooth with layer_granularity 2: a curve of 2 points": (
        {"smooth": True, "layer_granularity": 2, "merge_method": "linear"},
        expected({"weight": {**WEIGHT, "granularity": "curve", "points": 2}}, method="linear")),
    "smooth without layer_granularity: one value (global)": (
        {"smooth": True}, expected({"weight": WEIGHT, "density": DENSITY})),
}


def _genome(changes: dict) -> dict:
    """``evolve_config``'s genome with ``changes``; a change to None removes the key."""
    genome = {**evolve_config({})["genome"], **changes}
    return {k: v for k, v in genome.items() if v is not None}


@pytest.mark.parametrize("case", list(CONVERSIONS))
def test_each_genome_option_converts_to_the_hand_checked_search_config(case):
    changes, want = CONVERSIONS[case]
    conversion = convert({**evolve_config({}), "genome": _genome(changes)}, num_layers=LAYERS)
    assert conversion.config == want
    assert conversion.warnings == []
    check_method_parameters(SearchConfig.model_validate(conversion.config))


def test_tasks_keep_weights_and_metrics_and_top_level_settings_map():
    data = {"genome": _genome({}), "apply_chat_template": False,
            "tasks": ["closeness", {"name": "zoo_cap", "weight": 2.5, "metric": "exact_match,none"},
                     {"name": "gsm8k_train", "metric": "exact_match,strict-match"}],
            "limit": 50, "num_fewshot": 3, "task_search_path": ["configs/tasks"], "max_fevals": 40,
            "random_seed": 7, "batch_size": 8, "timeout": 600}
    config = convert(data, name="mine").config
    assert config["tasks"] == [{"name": "closeness", "weight": 1.0, "metric": "acc"},
                               {"name": "zoo_cap", "weight": 2.5, "metric": "exact_match"},
                               {"name": "gsm8k_train", "weight": 1.0, "metric": "exact_match,strict-match"}]
    assert {k: config[k] for k in ("name", "limit", "num_fewshot", "include_path", "n_trials", "seed",
                                   "batch_size", "timeout")} == {
        "name": "mine", "limit": 50, "num_fewshot": 3, "include_path": "configs/tasks", "n_trials": 40,
        "seed": 7, "batch_size": 8, "timeout": 600}


def test_settings_without_an_equivalent_are_one_warning_each_naming_the_key():
    data = {**evolve_config({}), "shuffle": True, "random_init": True, "num_gpus": 4, "load_in_4bit": True}
    warnings = convert(data).warnings
    assert [w.split(":")[0] for w in warnings] == ["shuffle", "random_init", "load_in_4bit", "num_gpus"]
    assert all(w.endswith("; ignored") for w in warnings)
    quiet = {**evolve_config({}), "shuffle": False, "random_init": False, "vllm": False}
    assert convert(quiet).warnings == []


def test_chat_template_multiturn_and_vllm_become_the_same_evomerge_settings():
    data = evolve_config({})
    del data["apply_chat_template"]  # mergekit-evolve's default: the chat template, few-shot as turns
    config = convert(data).config
    assert (config["apply_chat_template"], config["fewshot_as_multiturn"]) == (True, True)
    config = convert({**data, "fewshot_as_multiturn": False, "vllm": True}).config
    assert (config["apply_chat_template"], config["fewshot_as_multiturn"]) == (True, False)
    assert (config["evaluator"], config["device"]) == ("vllm", "cuda")
    assert "fewshot_as_multiturn" not in convert({**data, "apply_chat_template": False}).config
    SearchConfig.model_validate(config)


def test_lora_references_stay_sources_of_the_search():
    config = convert(evolve_config({"models": ["ft1", "base+adapter"]})).config
    assert config["models"] == ["ft1", "base+adapter"]
    SearchConfig.model_validate(config)


def test_a_genome_key_marks_a_mergekit_evolve_config():
    assert is_mergekit_evolve(evolve_config({}))
    assert not is_mergekit_evolve({"base_model": "b", "models": ["a"], "tasks": []})
    assert not is_mergekit_evolve(["genome"])


# Genomes for the comparison with mergekit's own genome code, on the 4-layer family. (mergekit-evolve adds
# a linear merge's base_model as an input without a weight, which mergekit refuses to merge.)
GENOMES = {
    "ties": {},
    "dare_ties normalized": {"merge_method": "dare_ties", "normalize": True},
    "task_arithmetic": {"merge_method": "task_arithmetic"},
    "linear": {"merge_method": "linear", "base_model": None, "models": ["ft1", "ft2", "ft3"]},
    "ties, blocks of 2": {"layer_granularity": 2},
    "ties, blocks of 1, 3 models": {"layer_granularity": 1, "models": ["ft1", "ft2", "ft3"]},
    "ties, filters": {"filters": ["self_attn", "mlp"]},
    "ties, smooth over 4 points": {"smooth": True, "layer_granularity": 1},
    "linear, smooth over 2 points": {"merge_method": "linear", "base_model": None, "smooth": True,
                                     "layer_granularity": 2},
    "task_arithmetic, negative weights": {"merge_method": "task_arithmetic", "allow_negative_weights": True},
    "slerp": {"merge_method": "slerp", "base_model": None},
    "slerp, blocks of 2": {"merge_method": "slerp", "base_model": None, "layer_granularity": 2},
}


def _paths(fam, genome: dict) -> dict:
    """The genome with the family's paths for its model names (other names stay as they are)."""
    out = dict(genome)
    if "models" in genome:
        out["models"] = [fam.get(m, m) for m in genome["models"]]
    if "base_model" in genome:
        out["base_model"] = fam.get(genome["base_model"], genome["base_model"])
    return out


def _both(fam, case):
    from mergekit.evo.genome import ModelGenome, ModelGenomeDefinition

    genome = _paths(fam, _genome(GENOMES[case]))
    config = SearchConfig.model_validate(convert({**evolve_config({}), "genome": genome}, num_layers=LAYERS).config)
    check_method_parameters(config)
    return ModelGenome(ModelGenomeDefinition.model_validate(genome)), config, genome


@pytest.mark.parametrize("case", list(GENOMES))
def test_the_search_has_the_dimensions_of_mergekit_evolves_genome(fam, case):
    """One dimension per genotype value; slerp's genotype holds one value per model and layer group of which
    only the difference of the two counts (the softmax), so evomerge's one t per layer group."""
    mergekit_genome, config, genome = _both(fam, case)
    genotype = mergekit_genome.initial_genotype()
    dims = dimensions(config, num_layers=LAYERS)
    per_model = 2 if genome["merge_method"] == "slerp" else 1
    assert genotype.numel() == per_model * len(dims)
    n_groups, n_models, n_sets, n_params = genotype.shape
    assert n_models == len(config.models) + (1 if genome["merge_method"] == "slerp" else 0)
    assert {d.param for d in dims} == set(METHOD_PARAMETERS[genome["merge_method"]]) and n_params == len(
        METHOD_PARAMETERS[genome["merge_method"]])
    assert len({(d.group, d.block, d.point) for d in dims}) == n_groups * n_sets
    low = -1.0 if genome.get("allow_negative_weights") else 0.0
    assert {(d.param, d.low, d.high) for d in dims} <= {("weight", low, 1.0), ("density", 0.01, 1.0),
                                                         ("t", 0.0, 1.0)}


def _evomerge_values(config: SearchConfig, dims, genotype: np.ndarray, filters: list[str]) -> dict[str, float]:
    """The point of evomerge's space that mergekit-evolve's ``genotype`` (groups × models × sets × params)
    merges to. Slerp: evomerge's t from its base to the other model is the softmax share of the other."""
    if config.method == "slerp":
        return {d.key: 1 / (1 + math.exp(genotype[d.block or 0, 0, 0, 0] - genotype[d.block or 0, 1, 0, 0]))
                for d in dims}
    params = METHOD_PARAMETERS[config.method]
    sets = [*filters, "rest"]
    return {d.key: float(genotype[d.block or d.point or 0, config.models.index(d.model),
                                  sets.index(d.group) if d.group else 0, params.index(d.param)]) for d in dims}


def _merged(recipe: dict, out) -> dict[str, torch.Tensor]:
    merge(load_recipe({**recipe, "dtype": "float32"}), out, seed=0, copy_tokenizer=False)
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("case", list(GENOMES))
def test_a_genotype_and_its_point_in_the_search_merge_to_the_same_model(fam, case, tmp_path):
    mergekit_genome, config, genome = _both(fam, case)
    shape = mergekit_genome.initial_genotype().shape
    genotype = np.random.default_rng(0).uniform(0.1, 0.9, size=shape)
    theirs = yaml.safe_load(mergekit_genome.genotype_merge_config(genotype).to_yaml())
    dims = dimensions(config, num_layers=LAYERS)
    ours = build_recipe(config, dims, _evomerge_values(config, dims, genotype, genome.get("filters") or []),
                        num_layers=LAYERS)
    a, b = _merged(theirs, tmp_path / "mergekit_evolve"), _merged(ours, tmp_path / "evomerge")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


class Closeness:
    """A cheap evaluator: the model's final norm, as the ``acc`` of the one task the config names."""

    def __init__(self):
        self.calls = 0

    def score(self, model, tokenizer) -> Scores:
        self.calls += 1
        value = float(model.state_dict()["model.norm.weight"].float().mean())
        return Scores({"closeness": TaskScore({"acc": value}, {"acc": True}, {"acc": [value]}, 1)}, 0.0)


def test_a_two_trial_search_runs_from_a_mergekit_evolve_config(fam, tmp_path, monkeypatch, capsys):
    import search.loop

    real = search.loop.search
    evaluator = Closeness()
    monkeypatch.setattr(search.loop, "search", lambda config, **kw: real(config, **{**kw, "evaluator": evaluator}))
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evolve.yaml"
    genome = _paths(fam, _genome({"layer_granularity": 2, "models": ["ft1", "ft2", "ft3"]}))
    path.write_text(yaml.safe_dump({**evolve_config({}), "genome": genome, "max_fevals": 2}))
    assert main(["search", "--from-mergekit-evolve", str(path), "--quiet", "--no-report"]) == 0
    assert "2 trials complete, 0 failed" in capsys.readouterr().out
    study = optuna.load_study(study_name="evolve", storage=f"sqlite:///{tmp_path}/results/evolve/study.db")
    assert len(study.trials) == 2
    assert len(study.trials[1].params) == 3 * 2 * 2  # 3 models × (weight, density) × 2 blocks
    recipe = study.trials[1].user_attrs["recipe"]
    assert [s["sources"][0]["layer_range"] for s in recipe["slices"]] == [[0, 2], [2, 4]]
    assert all(s["parameters"] == {"normalize": True} for s in recipe["slices"])
    assert evaluator.calls == 4 + 2  # the base and 3 sources, then the 2 trials


def test_print_config_shows_the_search_config_to_reuse(fam, tmp_path, capsys):
    path = tmp_path / "evolve.yaml"
    path.write_text(yaml.safe_dump({**evolve_config({"filters": ["mlp"]}), "genome": _paths(
        fam, _genome({"filters": ["mlp"]}))}))
    assert main(["validate", str(path), "--print-config", "--n-trials", "9"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["n_trials"] == 9 and printed["name"] == "evolve"
    assert printed["parameters"]["weight"] == {"low": 0.0, "high": 1.0, "granularity": "groups", "groups": ["mlp"]}
    reused = tmp_path / "search.yaml"
    reused.write_text(yaml.safe_dump(printed))
    assert main(["search", str(reused), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == printed


def test_a_mergekit_evolve_config_with_lm_eval_tasks_validates(fam, tmp_path, capsys):
    tasks = str(Path(__file__).resolve().parent.parent / "configs" / "tasks")
    path = tmp_path / "evolve.yaml"
    path.write_text(yaml.safe_dump({"genome": _paths(fam, _genome({})), "task_search_path": tasks,
                                    "tasks": [{"name": "zoo_cap", "metric": "exact_match,none"}],
                                    "apply_chat_template": False}))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr()
    assert "valid" in out.out and out.err.strip() == ""


# case: (config, genome changes, expected in the one line); "config" None: the genome changes apply to
# evolve_config, else the whole YAML document
BAD = {
    "not a mapping": (["genome"], None, "expected a mapping of mergekit-evolve config keys, got list"),
    "no genome": ({"tasks": ["closeness"]}, None, "genome: Field required"),
    "genome not a mapping": ({"genome": "ties", "tasks": ["closeness"]}, None, "genome: Input should be"),
    "genome without models": (None, {"models": None}, "genome.models: Field required"),
    "genome with no models": (None, {"models": []}, "genome.models: List should have at least 1 item"),
    "unknown merge_method": (None, {"merge_method": "breadcrumbs"},
                             "genome.merge_method: Input should be 'linear', 'task_arithmetic', 'ties', 'dare_ties' "
                             "or 'slerp'"),
    "ties without base_model": (None, {"base_model": None}, "base_model: ties needs a base_model"),
    "unknown genome key": (None, {"granularity": 2}, "genome.granularity: Extra inputs are not permitted"),
    "model listed twice": (None, {"models": ["ft1", "ft1"]}, "/llama/ft1' is listed twice"),
    "tokenizer_source": (None, {"tokenizer_source": "union"}, "genome.tokenizer_source: not supported"),
    "filter named rest": (None, {"filters": ["mlp", "rest"]}, "genome.filters: filter 'rest'"),
    "filters and layer_granularity": (None, {"filters": ["mlp"], "layer_granularity": 2},
                                      "genome.filters: evomerge searches a parameter per filter group or per block"),
    "filters and smooth": (None, {"filters": ["mlp"], "smooth": True}, "genome.filters: "),
    "slerp with smooth": (None, {"merge_method": "slerp", "smooth": True}, "genome.smooth: not supported for slerp"),
    "slerp of 3 models": (None, {"merge_method": "slerp", "base_model": None, "models": ["ft1", "ft2", "ft3"]},
                          "genome.models: slerp in evomerge interpolates exactly 2 models, got 3"),
    "slerp with a third base": (None, {"merge_method": "slerp"}, "genome.base_model: slerp interpolates the 2"),
    "base among the models": (None, {"models": ["ft1", "base"]}, "is listed among the models"),
    "layer_granularity not dividing the layers": (None, {"layer_granularity": 3},
                                                  "genome.layer_granularity: 3 does not divide the 4 layers"),
    "negative layer_granularity": (None, {"layer_granularity": -1}, "genome.layer_granularity"),
    "task without name": ({"tasks": [{"weight": 2}]}, {}, "tasks.0.name: Field required"),
    "no tasks": ({"tasks": []}, {}, "tasks: List should have at least 1 item"),
    "negative task weight": ({"tasks": [{"name": "closeness", "weight": -1}]}, {},
                             "tasks.0.weight: -1.0: evomerge maximizes a weighted average"),
    "task listed twice": ({"tasks": ["closeness", {"name": "closeness", "metric": "f1"}]}, {},
                          "tasks: task 'closeness' is listed twice"),
    "trust_remote_code": ({"trust_remote_code": True}, {}, "trust_remote_code: true is not supported"),
    "two task search paths": ({"task_search_path": ["a", "b"]}, {}, "task_search_path: ['a', 'b']: evomerge"),
    "unknown key": ({"max_evals": 5}, {}, "max_evals: Extra inputs are not permitted"),
    "zero max_fevals": ({"max_fevals": 0}, {}, "max_fevals: Input should be greater than or equal to 1"),
}


@pytest.mark.parametrize("command", ["validate", "search"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_mergekit_evolve_config_is_one_line_naming_the_field_exit_2(fam, tmp_path, capsys, command, case):
    document, genome, expected_text = BAD[case]
    if genome is not None:
        document = {**evolve_config({}), "genome": _paths(fam, _genome(genome)), **(document or {})}
    path = tmp_path / "evolve.yaml"
    path.write_text(yaml.safe_dump(document))
    capsys.readouterr()
    assert main([command, "--from-mergekit-evolve", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"evomerge {command}: error: {path}: ") and expected_text in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evolve.yaml"]


def test_a_config_without_genome_is_read_as_a_search_config(tmp_path, capsys):
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump({"tasks": ["closeness"]}))
    assert main(["validate", str(path)]) == 2
    assert "base_model: Field required" in capsys.readouterr().err


def test_convert_refuses_a_document_that_is_not_a_mapping():
    with pytest.raises(EvomergeError, match="expected a mapping of mergekit-evolve config keys, got str"):
        convert("genome: x")
