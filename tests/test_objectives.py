"""Objectives, scales, constraints and the Pareto rule on hand-made scores whose every number is checked by hand."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState, create_trial

from evaluators import Scores, TaskScore
from merge_core.errors import EvomergeError
from search.config import SearchConfig
from search.objectives import Objective, anchors_from
from search.report.pareto import choose_best, pareto_front
from search.report.statistics import margin_interval, paired_bootstrap
from search.space import METHOD_KEY, build_recipe, dimensions, dims_for, handwritten_point, source_points


def config(**extra) -> SearchConfig:
    data = {"base_model": "base", "models": ["a", "b"], "method": "linear",
            "parameters": {"weight": {"low": 0, "high": 1}},
            "tasks": [{"name": "acc"}, {"name": "ppl", "weight": 3}], **extra}
    return SearchConfig.model_validate(data)


def scores(acc: float, ppl: float, brier: float = 0.1, acc_docs=None) -> Scores:
    docs = acc_docs if acc_docs is not None else [acc] * 4
    return Scores({"acc": TaskScore({"acc": acc, "brier_score": brier}, {"acc": True, "brier_score": False},
                                    {"acc": list(map(float, docs))}, len(docs)),
                   "ppl": TaskScore({"perplexity": ppl}, {"perplexity": False})})


# base acc 0.2 ppl 10; source a: acc 0.6 ppl 12 (worse); source b: acc 0.4 ppl 5 (best perplexity)
BASELINES = {"base": scores(0.2, 10.0), "a": scores(0.6, 12.0), "b": scores(0.4, 5.0)}


def test_relative_scale_puts_the_base_at_0_and_the_best_source_at_1_in_each_metrics_direction():
    cfg = config(objective_scale="relative")
    objective = Objective(cfg, anchors_from(BASELINES, "base", cfg))
    candidate = scores(0.5, 6.0)
    assert objective.task_value(candidate, "acc") == pytest.approx((0.5 - 0.2) / (0.6 - 0.2))  # 0.75
    assert objective.task_value(candidate, "ppl") == pytest.approx((10 - 6) / (10 - 5))  # 0.8: lower is better
    assert objective.average(candidate) == pytest.approx((0.75 + 3 * 0.8) / 4)
    assert objective.average(BASELINES["base"]) == 0.0
    assert objective.task_value(BASELINES["a"], "acc") == objective.task_value(BASELINES["b"], "ppl") == 1.0


def test_relative_scale_keeps_higher_is_better_where_no_source_beats_the_base():
    """Held-out perplexity is often best for the base: the best source then sits at −1, a better model above 0."""
    worse = {"base": scores(0.2, 5.0), "a": scores(0.6, 8.0), "b": scores(0.4, 9.0)}
    cfg = config(objective_scale="relative")
    objective = Objective(cfg, anchors_from(worse, "base", cfg))
    assert objective.task_value(worse["a"], "ppl") == pytest.approx(-1.0)
    assert objective.task_value(scores(0.2, 4.0), "ppl") == pytest.approx(1 / 3)


def test_raw_scale_averages_perplexity_as_one_over_it_and_refuses_to_average_brier_score():
    objective = Objective(config())
    assert objective.average(scores(0.5, 4.0)) == pytest.approx((0.5 + 3 * 0.25) / 4)
    brier = config(tasks=[{"name": "acc", "metric": "brier_score"}, {"name": "ppl"}])
    with pytest.raises(EvomergeError, match="objective_scale: relative"):
        Objective(brier).average(scores(0.5, 4.0))
    alone = config(tasks=[{"name": "acc", "metric": "brier_score"}])
    assert Objective(alone).average(scores(0.5, 4.0, brier=0.3)) == pytest.approx(-0.3)  # its objective's only task
    relative = brier.model_copy(update={"objective_scale": "relative"})
    anchors = anchors_from({"base": scores(0.2, 10, brier=0.4), "a": scores(0.6, 12, brier=0.2)}, "base", relative)
    assert Objective(relative, anchors).task_value(scores(0.5, 4.0, brier=0.3), "acc") == pytest.approx(0.5)


def test_objectives_are_the_weighted_averages_of_their_tasks():
    cfg = config(objectives=["acc", {"name": "lm", "tasks": ["ppl"]}], sampler="nsga2")
    assert cfg.multi_objective and cfg.objective_groups == [("acc", ["acc"]), ("lm", ["ppl"])]
    assert Objective(cfg).values(scores(0.5, 4.0)) == pytest.approx([0.5, 0.25])


def test_constraint_margins_against_the_best_source_base_and_a_number():
    cfg = config(constraints=[{"task": "every", "no_worse_than": "best_source", "tolerance": 0.02},
                              {"task": "ppl", "no_worse_than": "best_source", "ratio": 1.1},
                              {"task": "acc", "no_worse_than": "base"},
                              {"task": "acc", "metric": "brier_score", "no_worse_than": 0.25}])
    objective = Objective(cfg, anchors_from(BASELINES, "base", cfg))
    candidate = scores(0.59, 5.4, brier=0.2)
    labels = [b.label for b in objective.bounds(candidate)]
    assert labels == ["acc acc ≥ best_source (a) − 0.02", "ppl perplexity ≤ best_source (b) + 0.02",
                      "ppl perplexity ≤ best_source (b) × 1.1", "acc acc ≥ base", "acc brier_score ≤ 0.25"]
    assert objective.margins(candidate, BASELINES) == pytest.approx(
        [0.59 - 0.58, 5.02 - 5.4, 5.5 - 5.4, 0.59 - 0.2, 0.25 - 0.2])


def test_constraint_margin_ci_moves_with_the_reference_models_documents():
    cfg = config(constraints=[{"task": "acc", "no_worse_than": "a"}])
    objective = Objective(cfg, anchors_from(BASELINES, "base", cfg))
    same = scores(0.5, 5, acc_docs=[1, 0, 1, 0])
    bound = objective.bounds(same)[0]
    assert margin_interval(same, same, bound, 0.5) == (0.0, 0.0)  # identical documents: no spread at all
    low, high = margin_interval(scores(0.5, 5, acc_docs=[1, 1, 0, 0]), same, bound, 0.5)
    assert low < 0 < high


def test_paired_bootstrap_on_the_relative_scale_is_the_raw_ci_divided_by_the_base_to_best_spread():
    cfg_raw = config(tasks=[{"name": "acc"}])
    cfg_rel = cfg_raw.model_copy(update={"objective_scale": "relative"})
    anchors = anchors_from(BASELINES, "base", cfg_rel)
    a, b = scores(0.5, 5, acc_docs=[1, 1, 0, 0, 1, 0, 1, 1]), scores(0.5, 5, acc_docs=[0, 1, 0, 0, 1, 0, 0, 1])
    raw = np.array(paired_bootstrap(a, b, cfg_raw))
    rel = np.array(paired_bootstrap(a, b, cfg_rel, objective=Objective(cfg_rel, anchors)))
    assert rel == pytest.approx(raw / 0.4)


def _trial(number: int, values: list[float], average: float, feasible: bool = True):
    trial = create_trial(values=values, params={}, distributions={},
                         user_attrs={"average": average, "feasible": feasible}, state=TrialState.COMPLETE)
    trial.number = number
    return trial


def test_pareto_front_and_the_best_feasible_pareto_trial_by_average():
    cfg = config(objectives=["acc", "ppl"], constraints=[{"task": "acc", "no_worse_than": "base"}])
    trials = [_trial(0, [0.9, 0.1], 0.5), _trial(1, [0.5, 0.5], 0.5), _trial(2, [0.4, 0.4], 0.45),
              _trial(3, [0.2, 0.95], 0.6), _trial(4, [1.0, 1.0], 1.0, feasible=False)]
    assert [t.number for t in pareto_front(trials)] == [4]
    assert [t.number for t in pareto_front(trials[:4])] == [0, 1, 3]
    ranked = sorted(trials, key=lambda t: -t.user_attrs["average"])
    order, front, rule = choose_best(ranked, cfg)
    assert order[0].number == 3 and [t.number for t in front] == [0, 1, 3]
    assert order[-1].number == 4  # the infeasible trial after every feasible one
    assert "4 of 5 complete trials satisfy every constraint" in rule


def test_with_no_feasible_trial_the_best_of_all_is_chosen_and_the_rule_says_so():
    cfg = config(constraints=[{"task": "acc", "no_worse_than": "base"}])
    ranked = [_trial(0, [0.9], 0.9, feasible=False), _trial(1, [0.8], 0.8, feasible=False)]
    order, _, rule = choose_best(ranked, cfg)
    assert order[0].number == 0 and "no trial satisfies every constraint" in rule


def test_a_method_list_is_a_categorical_dimension_with_each_methods_own_parameters():
    cfg = SearchConfig.model_validate({
        "base_model": "base", "models": ["a", "b"], "method": ["task_arithmetic", "ties", "dare_ties"],
        "parameters": {"weight": {"low": 0, "high": 1}, "density": {"low": 0.2, "high": 1}},
        "fixed": {"normalize": False}, "tasks": [{"name": "acc"}]})
    assert cfg.sampler_name == "tpe"
    dims = dimensions(cfg, num_layers=2)
    assert [d.key for d in dims_for(dims, "task_arithmetic")] == ["weight[a]", "weight[b]"]
    assert [d.key for d in dims_for(dims, "ties")] == ["weight[a]", "weight[b]", "density[a]", "density[b]"]
    start = handwritten_point(cfg, dims, "ties")
    assert start == {METHOD_KEY: "ties", "weight[a]": 0.5, "weight[b]": 0.5, "density[a]": 0.5, "density[b]": 0.5}
    recipe = build_recipe(cfg, dims, {METHOD_KEY: "task_arithmetic", "weight[a]": 0.3, "weight[b]": 0.7}, 2)
    assert recipe["merge_method"] == "task_arithmetic" and recipe["parameters"] == {"normalize": False}
    assert [m["parameters"] for m in recipe["models"]] == [{"weight": 0.3}, {"weight": 0.7}]
    assert source_points(cfg, dims)["a"] == {METHOD_KEY: "task_arithmetic", "weight[a]": 1.0, "weight[b]": 0.0}


def test_slerp_in_a_method_list_searches_t_only_for_slerp():
    cfg = SearchConfig.model_validate({
        "base_model": "base", "models": ["a"], "method": ["linear", "slerp"],
        "parameters": {"weight": {"low": 0, "high": 1}, "t": {"low": 0, "high": 1}}, "tasks": [{"name": "acc"}]})
    dims = dimensions(cfg, num_layers=2)
    assert [d.key for d in dims_for(dims, "slerp")] == ["t"]
    recipe = build_recipe(cfg, dims, {METHOD_KEY: "slerp", "t": 0.25}, 2)
    assert recipe == {"merge_method": "slerp", "dtype": "float32", "base_model": "base",
                      "models": [{"model": "a"}], "parameters": {"t": 0.25}}


def test_a_named_cmaes_sampler_is_refused_for_what_it_cannot_sample_and_tpe_is_the_default_there():
    with pytest.raises(ValueError, match="sampler: cmaes cannot serve constraints"):
        config(sampler="cmaes", constraints=[{"task": "acc", "no_worse_than": "base"}])
    assert config().sampler_name == "cmaes"
    assert config(constraints=[{"task": "acc", "no_worse_than": "base"}]).sampler_name == "tpe"


def test_a_constrained_tpe_search_ends_on_a_feasible_optimum():
    """Optuna's constrained TPE over a toy problem with the loop's constraint convention (≤ 0 satisfied)."""
    from search.samplers import make_sampler

    cfg = config(constraints=[{"task": "acc", "no_worse_than": "base"}], seed=1)
    study = optuna.create_study(direction="maximize", sampler=make_sampler(cfg, []))
    for _ in range(40):
        trial = study.ask()
        x = trial.suggest_float("x", 0, 1)
        trial.set_constraint("0", x - 0.6)  # feasible when x ≤ 0.6; the objective wants x large
        study.tell(trial, x)
    best = max((t for t in study.trials if t.constraints["0"] <= 0), key=lambda t: t.value)
    assert 0.5 < best.value <= 0.6
    assert math.isfinite(best.value)


def test_ties_go_to_the_trial_in_the_middle_of_the_plateau_and_two_ties_to_the_earliest():
    from optuna.distributions import FloatDistribution

    def tied(number, x, y):
        trial = create_trial(value=1.0, params={"x": x, "y": y},
                             distributions={"x": FloatDistribution(0, 1), "y": FloatDistribution(0, 10)})
        trial.number = number
        return trial

    # medians: x 0.5, y 4 (0.4 of its range): trial 8 sits there
    trials = [tied(3, 0.1, 1.0), tied(5, 0.9, 9.0), tied(8, 0.5, 4.0), tied(9, 0.45, 6.0), tied(12, 0.7, 2.0)]
    order, _, rule = choose_best(trials, config())
    assert order[0].number == 8 and "5 trials tie at 1: the one nearest the median" in rule
    order, _, rule = choose_best(trials[:2], config())
    assert order[0].number == 3 and "tie" not in rule
