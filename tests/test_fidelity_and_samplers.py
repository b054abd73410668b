"""Multi-fidelity (candidates scored on nested document subsets, pruned between rungs), the item budget, the
samplers (CMA-ES with restarts, GP, TPE, random) and warm starts at the sources."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from search.config import SearchConfig
from search.loop import open_workbench, search
from search.report import write_report
from search.samplers import RestartCmaEsSampler
from search.space import Dimension, dimensions, source_points
from tests.test_evaluators import FIXTURE_TASKS, make_noisy_family
from tests.test_search_loop import TARGET, DistanceEvaluator, config_for
from tests.test_search_loop import fam as fam  # noqa: F401  the random llama family fixture

DOCS = {"fx_pick": 12, "fx_yesno": 12}


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    return make_noisy_family(tmp_path_factory.mktemp("fidelity-family"), 0.3)


def fixture_config(noisy, tmp_path, **extra) -> SearchConfig:
    return SearchConfig.model_validate({
        "name": "f", "base_model": noisy["base"], "models": [noisy["ft1"], noisy["ft2"]],
        "method": "task_arithmetic", "parameters": {"weight": {"low": 0.0, "high": 1.0}},
        "tasks": [{"name": "fx_pick"}, {"name": "fx_yesno"}], "include_path": str(FIXTURE_TASKS),
        "batch_size": 8, "sampler": "random", "n_trials": 14, "output_dir": str(tmp_path / "run"), **extra})


def test_pruned_candidates_stop_at_a_rung_and_survivors_get_the_full_evaluation(noisy, tmp_path):
    config = fixture_config(noisy, tmp_path, fidelity={"rungs": [3, 6, "all"], "reduction_factor": 2})
    study = search(config, progress=False)
    trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(trials) == 14
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert pruned and complete
    full = sum(DOCS.values())
    assert all(t.user_attrs["items"] == full and t.user_attrs["rung"] == 2 for t in complete)
    assert {t.user_attrs["items"] for t in pruned} <= {6, 12}  # 3 or 6 documents of each task
    for t in pruned:  # reported at steps 2^rung; told at the last rung's value
        assert sorted(t.intermediate_values) == [2 ** r for r in range(t.user_attrs["rung"] + 1)]
        assert t.value == t.intermediate_values[max(t.intermediate_values)]
    # a survivor's score is a plain full evaluation of its recipe
    best = study.best_trial
    bench = open_workbench(config)
    bench.materialize(best.user_attrs["recipe"])
    from search.loop import objective_of

    assert objective_of(bench.evaluator.score(bench.model, bench.tokenizer), config) == pytest.approx(best.value)
    report = write_report(config.run_dir, test=False)
    text = report.read_text()
    assert f"{len(pruned)} pruned" in text and "saved)" in text and "after rung" in text


def test_the_item_budget_stops_the_search_once_spent(noisy, tmp_path):
    config = fixture_config(noisy, tmp_path, n_trials=None, max_items=100)
    study = search(config, progress=False)
    spent = [t.user_attrs["items"] for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert sum(spent) >= 100 and sum(spent) - spent[-1] < 100  # stopped by the trial that reached it
    assert len(spent) == 5  # 24 item-evaluations each


@pytest.mark.parametrize("sampler", ["cmaes", "cmaes_ipop", "cmaes_bipop", "tpe", "gp", "random"])
def test_every_sampler_improves_on_the_handwritten_start(fam, tmp_path, sampler):  # noqa: F811
    study = search(config_for(fam, tmp_path, sampler=sampler, n_trials=30), evaluator=DistanceEvaluator(fam),
                   progress=False)
    handwritten = next(t for t in study.trials if t.user_attrs.get("handwritten"))
    assert study.best_value > handwritten.value + 0.05
    if sampler != "random":
        assert study.best_params["weight[ft1]"] == pytest.approx(TARGET[0], abs=0.2)
        assert study.best_params["weight[ft2]"] == pytest.approx(TARGET[1], abs=0.2)


def test_sources_are_told_as_free_warm_starts_where_the_space_holds_them(fam, tmp_path):  # noqa: F811
    config = config_for(fam, tmp_path, warm_start=["handwritten", "sources"], n_trials=6)
    evaluator = DistanceEvaluator(fam)
    study = search(config, evaluator=evaluator, progress=False)
    told = {t.user_attrs["source"]: t for t in study.trials if "source" in t.user_attrs}
    assert set(told) == {"ft1", "ft2"}
    assert told["ft1"].params == {"weight[ft1]": 1.0, "weight[ft2]": 0.0}
    baselines = study.user_attrs["baselines"]
    assert all(t.value == baselines[label]["objective"] for label, t in told.items())
    assert len([t for t in study.trials if "source" not in t.user_attrs]) == 6  # not counted in the budget
    assert evaluator.calls == 3 + 6  # baselines, then the trials: the warm starts cost nothing
    # the point reproduces the source: its recipe materialized scores what the source scored
    bench = open_workbench(config, evaluator=DistanceEvaluator(fam))
    bench.materialize(told["ft1"].user_attrs["recipe"])
    assert bench.evaluator.score(bench.model, None).value("closeness") == pytest.approx(
        baselines["ft1"]["objective"], abs=1e-6)


def test_sources_are_no_point_of_a_space_that_cannot_reach_them(fam, tmp_path):  # noqa: F811
    narrow = config_for(fam, tmp_path, parameters={"weight": {"low": 0.2, "high": 1.5}})
    assert source_points(narrow, dimensions(narrow, 2)) == {}
    dropped = config_for(fam, tmp_path, method="ties", fixed={"density": 0.5})
    assert source_points(dropped, dimensions(dropped, 2)) == {}
    ties = config_for(fam, tmp_path, method="ties",
                      parameters={"weight": {"low": 0.0, "high": 1.0}, "density": {"low": 0.1, "high": 1.0}})
    assert source_points(ties, dimensions(ties, 2))["ft2"] == {
        "weight[ft1]": 0.0, "weight[ft2]": 1.0, "density[ft1]": 1.0, "density[ft2]": 1.0}


DIMS = [Dimension(f"x{i}", "weight", None, None, None, None, 0.0, 1.0) for i in range(2)]


def _flat_study(sampler, trials: int) -> optuna.Study:
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(lambda trial: 0.5 + 0 * sum(trial.suggest_float(d.key, 0, 1) for d in DIMS), n_trials=trials)
    return study


@pytest.mark.parametrize("bipop", [False, True])
def test_cma_restarts_on_a_plateau_with_a_larger_population(bipop):
    sampler = RestartCmaEsSampler(DIMS, seed=3, bipop=bipop)
    study = _flat_study(sampler, 6)  # one generation of the default population (4 + 3 ln 2 = 6), all equal
    run = sampler.replay(study, ["x0", "x1"], *_unit())
    assert run.optimizer.population_size == 12 and run.regime == "large"
    study.optimize(lambda trial: 0.5 + 0 * trial.suggest_float("x0", 0, 1) + 0 * trial.suggest_float("x1", 0, 1),
                   n_trials=12)
    run = sampler.replay(study, ["x0", "x1"], *_unit())
    if bipop:  # the small regime has spent less than the large one: a small population next
        assert run.regime == "small" and run.optimizer.population_size < 12
    else:
        assert run.optimizer.population_size == 24


def test_restart_cma_gives_workers_the_same_distribution_and_each_trial_its_own_point():
    import numpy as np

    a, b = RestartCmaEsSampler(DIMS, seed=1), RestartCmaEsSampler(DIMS, seed=1)
    study = optuna.create_study(direction="maximize", sampler=a)
    study.optimize(lambda t: -(t.suggest_float("x0", 0, 1) - 0.3) ** 2 - (t.suggest_float("x1", 0, 1) - 0.6) ** 2,
                   n_trials=20)
    space = a.infer_relative_search_space(study, None)
    trial_a, trial_b = study.ask(), study.ask()
    point = a.sample_relative(study, trial_a, space)
    assert b.sample_relative(study, trial_a, space) == point  # another worker agrees on trial_a
    assert a.sample_relative(study, trial_b, space) != point
    assert np.allclose(list(point.values()), [0.3, 0.6], atol=0.25)


def _unit():
    import numpy as np

    return np.zeros(2), np.ones(2)
