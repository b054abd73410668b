"""Layer paths: the live path equals its recipe merged (by evomerge and by mergekit) and shares the sources'
tensors; the space's repair and round trips; a layer-path search and a PS + DFS search through the CLI with a
cheap evaluator; bad input as one line with exit 2."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from evaluators import Scores, TaskScore
from merge_core.adapters import SourceOpener
from merge_core.engine import merge
from merge_core.errors import EvomergeError
from merge_core.memory import load_in_memory
from merge_core.recipe import load_recipe
from merge_core.routing import LayerBank, Slot, assemble, live_model, path_of_recipe, path_recipe, runs
from search.cli import main
from search.config import SearchConfig
from search.loop import search
from search.routing import routing_space
from tests.families import extend_with_perturbed_layers, make_family
from tests.test_merge_vs_mergekit import load_weights, run_mergekit

INPUTS = torch.tensor([[5, 9, 2, 40, 7, 11, 3, 60], [1, 2, 3, 4, 5, 6, 7, 8]])


def _fam(root, arch, layers=4):
    return {k: str(v) for k, v in make_family(root, arch, n_finetunes=2, layers=layers).items()}


def _bank(fam, dtype=torch.float32):
    opener = SourceOpener()
    sources = load_in_memory({v: opener.open(v) for v in fam.values()}, dtype=dtype)
    return LayerBank(sources, dtype), sources


def _path(fam):
    a, b = fam["ft1"], fam["ft2"]
    return [Slot(a, 0), Slot(a, 1, 0.7), Slot(b, 1, 0.7), Slot(b, 3), Slot(a, 3), Slot(a, 3, 1.3), Slot(b, 2)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_a_live_path_equals_its_recipe_merged_and_generates_the_same(tmp_path, arch):
    fam = _fam(tmp_path, arch)
    bank, _ = _bank(fam)
    live = assemble(live_model(bank, fam["base"]), bank, _path(fam))
    recipe = path_recipe(_path(fam), "float32")
    merge(load_recipe(recipe), tmp_path / "out", copy_tokenizer=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert live.config.num_hidden_layers == merged.config.num_hidden_layers == 7
    with torch.no_grad():
        diff = (live(INPUTS).logits - merged(INPUTS).logits).abs().max().item()
        assert diff < 1e-5, diff
        # generation runs the KV cache: each slot must have its own entry
        mask = torch.ones_like(INPUTS[:, :4])
        want = merged.generate(INPUTS[:, :4], attention_mask=mask, max_new_tokens=8, do_sample=False)
        got = live.generate(INPUTS[:, :4], attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)


def test_the_exported_recipe_is_mergekits_passthrough_with_the_same_tensors(tmp_path):
    fam = _fam(tmp_path, "llama")
    recipe = path_recipe(_path(fam), "float32")
    expected = run_mergekit(recipe, tmp_path / "mergekit")
    merge(load_recipe(recipe), tmp_path / "evomerge", copy_tokenizer=False)
    got = load_weights(tmp_path / "evomerge")
    assert sorted(got) == sorted(expected)
    assert all(torch.allclose(got[n], expected[n], atol=1e-7) for n in expected)
    assert len(recipe["slices"]) == 7  # each slot its own run here: a scale or a model changes at each


def test_a_live_path_shares_the_sources_tensors_and_leaves_them_unchanged(tmp_path):
    fam = _fam(tmp_path, "llama")
    bank, sources = _bank(fam)
    before = {n: t.clone() for n, t in sources[fam["ft1"]].tensors.items()}
    live = assemble(live_model(bank, fam["base"]), bank, _path(fam))
    q = live.model.layers[1].self_attn.q_proj.weight
    assert q.data_ptr() == sources[fam["ft1"]].tensors["model.layers.1.self_attn.q_proj.weight"].data_ptr()
    with torch.no_grad():
        live(INPUTS)
        assemble(live, bank, [Slot(fam["ft2"], 0)])
        live(INPUTS)
    assert all(torch.equal(before[n], t) for n, t in sources[fam["ft1"]].tensors.items())
    assert live.config.num_hidden_layers == 1 and len(live.model.layers) == 1
    # the bank's own layers keep their indices and carry no hook
    assert bank.models[fam["ft1"]].model.layers[3].self_attn.layer_idx == 3
    assert not bank.models[fam["ft1"]].model.layers[1].self_attn.o_proj._forward_hooks


def test_layer_types_follow_the_path(tmp_path):
    fam = _fam(tmp_path, "qwen2")
    bank, _ = _bank(fam)
    bank.models[fam["ft2"]].config.layer_types = ["sliding_attention"] * 4
    live = assemble(live_model(bank, fam["base"]), bank, [Slot(fam["ft1"], 0), Slot(fam["ft2"], 2),
                                                            Slot(fam["ft1"], 3)])
    assert live.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]


def test_recipe_and_path_round_trip_and_consecutive_layers_share_a_slice():
    path = [Slot("a", 0), Slot("a", 1), Slot("a", 2, 0.5), Slot("b", 0), Slot("a", 1)]
    assert runs(path) == [("a", 0, 2, 1.0), ("a", 2, 3, 0.5), ("b", 0, 1, 1.0), ("a", 1, 2, 1.0)]
    recipe = path_recipe(path, "bfloat16", {"a": "/m/a"})
    assert recipe["slices"][1]["sources"][0] == {"model": "/m/a", "layer_range": [2, 3], "parameters": {"scale": [
        {"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.5}, {"value": 1.0}]}}
    assert path_of_recipe(path_recipe(path, "float32")) == path


def test_a_recipe_scaling_other_tensors_is_not_a_live_path():
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2],
              "parameters": {"scale": [{"filter": "q_proj", "value": 0.5}, {"value": 1.0}]}}]}]}
    with pytest.raises(EvomergeError, match=r"slices\[0\].sources\[0\].parameters.scale"):
        path_of_recipe(recipe)


def _space(min_layers=1, max_layers=None, **routing):
    config = SearchConfig.model_validate({"base_model": "base", "models": ["a", "b"], "tasks": [{"name": "t"}],
                                          "routing": {"min_layers": min_layers, "max_layers": max_layers, **routing}})
    return routing_space(config, {"a": 3, "b": 2})


def test_the_space_repairs_a_point_to_the_length_bounds_by_its_keep_values():
    space = _space(min_layers=2, max_layers=3)
    assert space.slots == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]
    keys = [d.key for d in space.dims if d.param == "keep"]
    point = dict(zip(keys, [0.9, 0.1, 0.8, 0.7, 0.95]))  # 4 kept: the lowest kept (b0, 0.7) goes
    assert [(s.model, s.layer) for s in space.path(point)] == [("a", 0), ("a", 2), ("b", 1)]
    point = dict(zip(keys, [0.2, 0.4, 0.1, 0.3, 0.6]))  # 1 kept: the highest of the rest (a1) joins
    assert [(s.model, s.layer) for s in space.path(point)] == [("a", 1), ("b", 1)]
    assert space.start == [("a", 0), ("a", 1), ("a", 2)]
    assert [(s.model, s.layer) for s in space.path(space.start_point())] == space.start


def test_neighbors_add_drop_or_swap_one_slot():
    space = _space(min_layers=1, max_layers=5)
    keys = [d.key for d in space.dims if d.param == "keep"]
    point = dict(zip(keys, [1.0, 0.0, 1.0, 0.0, 0.0]))  # a0, a2
    paths = {tuple((s.model, s.layer) for s in space.path(p)) for p in space.neighbors(point)}
    flips = {(("a", 2),), (("a", 0),), (("a", 0), ("a", 1), ("a", 2)), (("a", 0), ("a", 2), ("b", 0)),
             (("a", 0), ("a", 2), ("b", 1))}
    swaps = {(("a", 1), ("a", 2)), (("a", 2), ("b", 0)), (("a", 2), ("b", 1)), (("a", 0), ("a", 1)),
             (("a", 0), ("b", 0)), (("a", 0), ("b", 1))}
    assert paths == flips | swaps
    assert len(space.neighbors(point)) == len(flips | swaps)  # each a different path


def test_layer_paths_default_to_nsga2_and_to_tpe_with_fidelity():
    data = {"base_model": "base", "models": ["a"], "tasks": [{"name": "t"}], "routing": {}}
    assert SearchConfig.model_validate(data).sampler_name == "nsga2"
    assert SearchConfig.model_validate({**data, "fidelity": {"rungs": [5, "all"]}}).sampler_name == "tpe"


def test_repeats_and_scales_make_the_dimensions():
    space = _space(repeats=2, scale={"low": 0.5, "high": 1.5})
    assert len(space.slots) == 10 and len(space.dims) == 20
    assert space.dims[1].key == "scale[00:a.0]" and (space.dims[1].low, space.dims[1].high) == (0.5, 1.5)
    assert space.point([("b", 1), ("a", 0)]) is not None  # b1 of the first round, a0 of the second
    assert space.point([("a", 1), ("a", 0), ("a", 0)]) is None  # a0 appears only twice after a1


class TeacherEvaluator:
    """Scores a live model by how close its logits are to a teacher's on fixed sequences (one document each)."""

    def __init__(self, teacher_dir, n_docs: int = 6):
        self.teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
        self.inputs = torch.Generator().manual_seed(0)
        self.docs = torch.randint(0, 90, (n_docs, 10), generator=self.inputs)
        with torch.no_grad():
            self.want = self.teacher(self.docs).logits
        self.scale = float(self.want.var())

    def score(self, model, tokenizer) -> Scores:
        with torch.no_grad():
            got = model(self.docs).logits
        per_doc = [math.exp(-float(((g - w) ** 2).mean()) / self.scale) for g, w in zip(got, self.want)]
        value = sum(per_doc) / len(per_doc)
        return Scores({"closeness": TaskScore({"score": value}, {"score": True}, {"score": per_doc},
                                              len(per_doc))}, 0.0)


def _config(tmp_path, **extra):
    return {"name": "route", "tasks": [{"name": "closeness"}], "include_path": None,
            "output_dir": str(tmp_path / "run"), "seed": 0, **extra}


def test_a_layer_path_search_recovers_the_original_layers_of_a_model_extended_with_perturbed_copies(tmp_path):
    fam = _fam(tmp_path, "llama")
    extended = tmp_path / "extended"
    originals = extend_with_perturbed_layers(tmp_path / "llama" / "ft1", extended, copies=1, noise=1.0)
    config = SearchConfig.model_validate(_config(tmp_path, base_model=fam["base"], models=[str(extended)],
                                                 routing={"min_layers": 2}, sampler="tpe", n_trials=100))
    study = search(config, evaluator=TeacherEvaluator(fam["ft1"]), progress=False)
    best = max((t for t in study.trials if t.value is not None), key=lambda t: t.value)
    path = path_of_recipe(best.user_attrs["recipe"])
    assert [s.layer for s in path] == originals, path
    assert best.value > 0.999
    # a path proposed again is told its score without an evaluation, and a path one move from the best queued
    again = [t for t in study.trials if "same_as" in t.user_attrs]
    assert all(t.user_attrs["items"] == 0 and t.value == study.trials[t.user_attrs["same_as"]].value for t in again)


def test_ps_plus_dfs_runs_both_stages_and_the_stage_recipe_merges_to_the_evaluated_model(tmp_path, monkeypatch,
                                                                                         capsys):
    fam = _fam(tmp_path, "llama")
    config = _config(tmp_path, base_model=fam["base"], models=[fam["ft1"], fam["ft2"]], method="task_arithmetic",
                     parameters={"weight": {"low": 0.0, "high": 1.0}}, n_trials=6,
                     routing={"sources": ["merge", fam["ft2"]], "max_layers": 6, "scale": {"low": 0.5, "high": 1.5},
                              "n_trials": 8, "sampler": "tpe"})
    path = tmp_path / "psdfs.yaml"
    path.write_text(yaml.safe_dump(config))
    evaluator = TeacherEvaluator(fam["ft1"])
    monkeypatch.setattr("search.preflight.build_checked_evaluator", lambda config: evaluator)
    monkeypatch.setattr("search.preflight.build_evaluator", lambda config, split="search": evaluator)
    monkeypatch.setattr("search.loop.build_evaluator", lambda config, split="search": evaluator)
    import search.report.leaderboard  # the test split's evaluator too (bound when the module was imported)
    monkeypatch.setattr(search.report.leaderboard, "build_evaluator", lambda config, split="search": evaluator)
    assert main(["search", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "route: 6 trials complete" in out and "route-routing: 8 trials complete" in out
    run = tmp_path / "run"
    stage = run / "routing"
    merged = next(stage.glob("merge_trial*"))
    assert (merged / "config.json").is_file()
    board = (stage / "leaderboard.md").read_text()
    assert "## Stage 1: parameter search" in board and merged.name in board
    assert "## Layer path of the best recipe" in board
    assert "## Stage 2: layer paths" in (run / "leaderboard.md").read_text()
    best = yaml.safe_load((stage / "best_recipe.yaml").read_text())
    assert best["merge_method"] == "passthrough"
    merge(load_recipe(best), tmp_path / "best", copy_tokenizer=False)
    value = evaluator.score(AutoModelForCausalLM.from_pretrained(tmp_path / "best"), None).value("closeness")
    assert value == pytest.approx(best["evomerge"]["objective"], abs=1e-5)


def test_a_layer_path_search_resumes_where_it_stopped(tmp_path):
    fam = _fam(tmp_path, "qwen2")
    data = _config(tmp_path, base_model=fam["base"], models=[fam["ft1"], fam["ft2"]],
                   routing={"max_layers": 5, "scale": {"low": 0.5, "high": 1.5}}, n_trials=5)
    evaluator = TeacherEvaluator(fam["ft1"])
    first = search(SearchConfig.model_validate(data), evaluator=evaluator, progress=False)
    numbers = [t.number for t in first.trials if "source" not in t.user_attrs]
    again = search(SearchConfig.model_validate({**data, "n_trials": 9}), evaluator=evaluator, progress=False)
    counted = [t for t in again.trials if "source" not in t.user_attrs]
    assert len(counted) == 9 and [t.number for t in counted][:5] == numbers
    assert all(len(path_of_recipe(t.user_attrs["recipe"])) <= 5 for t in counted if t.value is not None)


def test_a_path_told_again_has_the_recipe_of_the_trial_it_repeats_with_constraints_too(tmp_path):
    fam = _fam(tmp_path, "llama", layers=2)
    data = _config(tmp_path, base_model=fam["base"], models=[fam["ft1"]], routing={}, sampler="tpe", n_trials=25,
                   constraints=[{"task": "closeness", "no_worse_than": 0.0}])
    study = search(SearchConfig.model_validate(data), evaluator=TeacherEvaluator(fam["ft1"]), progress=False)
    again = [t for t in study.trials if "same_as" in t.user_attrs]
    assert again  # 3 paths through 2 slots: 25 trials must repeat some
    for t in again:
        assert t.user_attrs["recipe"]["slices"] == study.trials[t.user_attrs["same_as"]].user_attrs["recipe"]["slices"]


def _write(tmp_path, data):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    fam = _fam(root, "llama")
    other = {k: str(v) for k, v in make_family(root / "other", "qwen2", n_finetunes=1).items()}
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                        tie_word_embeddings=False))
    wide.save_pretrained(root / "wide")
    return fam, {**other, "wide": str(root / "wide")}


def _bad_cases(fam, other):
    base = {"base_model": fam["base"], "models": [fam["ft1"], fam["ft2"]], "tasks": [{"name": "zoo_rev"}],
            "include_path": "configs/tasks"}
    return {
        "start longer than max_layers": ({**base, "routing": {"max_layers": 2, "start": [
            {"model": "ft1", "layer_range": [0, 4]}]}}, "routing: start: a path of 4 layers, outside"),
        "slot naming a missing model": ({**base, "routing": {"slots": [{"model": "ft9", "layer_range": [0, 2]}]}},
                                        "routing.slots[0].model: 'ft9' is not a source of the layer path"),
        "slot naming a missing layer": ({**base, "routing": {"slots": [{"model": "ft1", "layer_range": [2, 6]}]}},
                                        "routing.slots[0].layer_range: [2, 6], but ft1 has 4 layers (0–3)"),
        "max_layers beyond the slots": ({**base, "routing": {"max_layers": 20}},
                                        "routing.max_layers: 20, but there are 8 candidate slots"),
        "min above max": ({**base, "routing": {"min_layers": 5, "max_layers": 3}},
                          "routing: max_layers (3) is below min_layers (5)"),
        "sources of another architecture": ({**base, "models": [fam["ft1"], other["ft1"]], "routing": {}},
                                            "models: " + other["ft1"] + ": its model_type is 'qwen2'"),
        "sources of another width": ({**base, "models": [fam["ft1"], other["wide"]], "routing": {}},
                                     "models: " + other["wide"] + ": its hidden_size is 48 but"),
        "merge without a parameter search": ({**base, "routing": {"sources": ["merge"]}},
                                             "routing.sources: 'merge' is the parameter search's best merge"),
        "start off the slots' order": ({**base, "routing": {"start": [{"model": "ft2", "layer_range": [0, 1]},
                                                                      {"model": "ft1", "layer_range": [0, 1]}]}},
                                       "routing.start: not a path through the candidate slots in their order"),
        "scale without 1": ({**base, "routing": {"scale": {"low": 1.2, "high": 2}}},
                            "routing.scale: [1.2, 2.0] must hold 1"),
        "vllm": ({**base, "routing": {}, "evaluator": "vllm", "device": "cuda"},
                 "routing: a vLLM engine has a fixed number of layers"),
    }


CASES = ["start longer than max_layers", "slot naming a missing model", "slot naming a missing layer",
         "max_layers beyond the slots", "min above max", "sources of another architecture", "sources of another width",
         "merge without a parameter search", "start off the slots' order", "scale without 1", "vllm"]


@pytest.mark.parametrize("command", ["validate", "search"])
@pytest.mark.parametrize("case", CASES)
def test_bad_layer_path_config_is_one_line_naming_the_field_exit_2(shapes, tmp_path, capsys, command, case):
    fam, other = shapes
    data, expected = _bad_cases(fam, other)[case]
    data = {**data, "output_dir": str(tmp_path / "run")}
    path = _write(tmp_path, data)
    capsys.readouterr()
    assert main([command, str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_a_scale_on_a_post_norm_architecture_is_refused(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from merge_core.memory import TensorSource

    model = Gemma2ForCausalLM(Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=96))
    source = TensorSource(dict(model.state_dict()), model.config.to_dict())
    bank = LayerBank({"g": source}, torch.float32)
    live = live_model(bank, "g")
    assemble(live, bank, [Slot("g", 1), Slot("g", 0)])  # no scale: fine
    with pytest.raises(EvomergeError, match="post_feedforward_layernorm"):
        assemble(live, bank, [Slot("g", 0, 0.5)])
