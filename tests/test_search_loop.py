"""The search loop on a small random family with a cheap, exact evaluator: optimization, failures, resume."""

from __future__ import annotations

import math

import pytest
import torch
from optuna.trial import TrialState

from evaluators import Scores, TaskScore
from merge_core.errors import EvomergeError
from search.config import SearchConfig
from search.loop import search
from search.space import build_recipe, dimensions
from tests.families import make_family

TARGET = (0.9, 0.2)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return {k: str(v) for k, v in make_family(tmp_path_factory.mktemp("search"), "llama", n_finetunes=2).items()}


class DistanceEvaluator:
    """Scores a model by how close its weights are to a known task-arithmetic target (1 = identical)."""

    def __init__(self, fam, fail_every: int = 0):
        from transformers import AutoModelForCausalLM

        base, a, b = (AutoModelForCausalLM.from_pretrained(fam[k]).state_dict() for k in ("base", "ft1", "ft2"))
        self.target = {n: base[n] + TARGET[0] * (a[n] - base[n]) + TARGET[1] * (b[n] - base[n]) for n in base}
        self.scale = sum(((a[n] - base[n]) ** 2).sum() + ((b[n] - base[n]) ** 2).sum() for n in base).item()
        self.calls = 0
        self.fail_every = fail_every

    def score(self, model, tokenizer) -> Scores:
        self.calls += 1
        if self.fail_every and self.calls % self.fail_every == 0:
            raise RuntimeError("evaluator exploded")
        state = model.state_dict()
        dist = sum(((state[n] - t) ** 2).sum() for n, t in self.target.items()).item() / self.scale
        value = math.exp(-dist)
        return Scores({"closeness": TaskScore({"score": value}, {"score": True}, {"score": [value]}, 1)}, 0.0)


def config_for(fam, tmp_path, **extra) -> SearchConfig:
    return SearchConfig.model_validate({
        "name": "t", "base_model": fam["base"], "models": [fam["ft1"], fam["ft2"]], "method": "task_arithmetic",
        "parameters": {"weight": {"low": 0.0, "high": 1.5}}, "tasks": [{"name": "closeness"}], "n_trials": 40,
        "storage": f"sqlite:///{tmp_path}/study.db", "output_dir": str(tmp_path), **extra})


def test_cmaes_converges_to_the_target_weights_and_beats_the_handwritten_start(fam, tmp_path):
    study = search(config_for(fam, tmp_path), evaluator=DistanceEvaluator(fam), progress=False)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 40
    first = complete[0]
    assert first.user_attrs["handwritten"] and first.params == {"weight[ft1]": 0.5, "weight[ft2]": 0.5}
    assert study.best_value > first.value
    assert study.best_params["weight[ft1]"] == pytest.approx(TARGET[0], abs=0.1)
    assert study.best_params["weight[ft2]"] == pytest.approx(TARGET[1], abs=0.1)
    baselines = study.user_attrs["baselines"]
    assert set(baselines) == {"base", "ft1", "ft2"}
    assert study.best_value > max(b["objective"] for b in baselines.values())
    assert study.best_trial.user_attrs["recipe"]["merge_method"] == "task_arithmetic"


def test_failing_candidates_are_marked_failed_with_reason_count_against_the_budget_and_the_search_goes_on(
        fam, tmp_path):
    evaluator = DistanceEvaluator(fam, fail_every=4)  # calls 1-3 score the baselines: trials 0 and 4 fail
    study = search(config_for(fam, tmp_path, n_trials=8), evaluator=evaluator, progress=False)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert [t.number for t in failed] == [0, 4]
    assert all(t.user_attrs["fail_reason"] == "RuntimeError: evaluator exploded" for t in failed)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 6
    assert len(study.trials) == 8


def test_running_again_resumes_the_study_without_repeating_trials(fam, tmp_path):
    config = config_for(fam, tmp_path, n_trials=5)
    search(config, evaluator=DistanceEvaluator(fam), progress=False)
    evaluator = DistanceEvaluator(fam)
    study = search(config.model_copy(update={"n_trials": 9}), evaluator=evaluator, progress=False)
    numbers = [t.number for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert numbers == list(range(9))
    assert evaluator.calls == 4  # baselines were stored with the study, only the 4 new trials were scored
    assert len([t for t in study.trials if t.user_attrs.get("handwritten")]) == 1


def test_block_and_group_granularities_build_mergekit_recipes(fam, tmp_path):
    config = config_for(fam, tmp_path, method="ties", block_size=2, parameters={
        "weight": {"low": 0, "high": 1, "granularity": "blocks"},
        "density": {"low": 0.1, "high": 1, "granularity": "groups", "groups": ["self_attn", "mlp"]}})
    dims = dimensions(config, num_layers=4)
    assert len(dims) == 2 * 2 + 2 * 3
    recipe = build_recipe(config, dims, {d.key: 0.5 for d in dims}, num_layers=4)
    assert [s["sources"][0]["layer_range"] for s in recipe["slices"]] == [[0, 2], [2, 4]]
    assert recipe["slices"][0]["sources"][0]["model"] == fam["base"]
    assert recipe["slices"][1]["sources"][1]["parameters"]["density"][-1] == {"value": 0.5}


def test_slerp_t_curve_is_a_gradient_over_depth(fam, tmp_path):
    config = config_for(fam, tmp_path, method="slerp", models=[fam["ft1"]],
                        parameters={"t": {"low": 0, "high": 1, "granularity": "curve", "points": 4}})
    dims = dimensions(config, num_layers=4)
    recipe = build_recipe(config, dims, {d.key: i / 3 for i, d in enumerate(dims)}, num_layers=4)
    assert recipe["parameters"]["t"] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert recipe["base_model"] == fam["base"]


def test_unknown_search_parameter_is_refused(fam, tmp_path):
    from search.config import check_method_parameters

    with pytest.raises(EvomergeError, match="slerp has no parameter 'density'"):
        check_method_parameters(config_for(fam, tmp_path, method="slerp",
                                           parameters={"density": {"low": 0.1, "high": 1}}))


@pytest.mark.parametrize("budget", [0, 40_000, None])
def test_materialized_candidates_match_a_fresh_merge_whatever_the_precompute_budget(fam, budget):
    """Within the budget tensors take the precomputed path, beyond it the streaming one: same bytes."""
    from transformers import AutoModelForCausalLM

    from merge_core.checkpoint import CheckpointReader
    from merge_core.engine import merge_into
    from merge_core.memory import TensorSource
    from merge_core.recipe import load_recipe

    sources = {ref: TensorSource.load(CheckpointReader(fam[ref])) for ref in ("base", "ft1", "ft2")}
    live, fresh = (AutoModelForCausalLM.from_pretrained(fam["base"]) for _ in range(2))
    cache = {}
    for density in (0.3, 0.8, 0.3):
        recipe = load_recipe({"merge_method": "ties", "base_model": "base", "models": [
            {"model": "ft1", "parameters": {"weight": 0.7, "density": density}},
            {"model": "ft2", "parameters": {"weight": 0.5, "density": 1.1 - density}}]})
        merge_into(live, recipe, sources, cache=cache, precompute_bytes=budget)
        merge_into(fresh, recipe, sources)
        assert all(torch.equal(a, b) for a, b in zip(live.state_dict().values(), fresh.state_dict().values()))
    assert cache["precomputed_bytes"] <= (budget if budget is not None else float("inf"))
