"""Merges that lose nothing, on the demo family: two objectives, a no-regression constraint checked on the test
split, a lower-is-better objective, and the method searched too. Each search is one of the configs users get
(configs/demo_*.yaml)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from evaluators import Scores
from merge_core.recipe import load_recipe
from search import demo
from search.config import load_search_config
from search.loop import rank_key, search
from search.report import TEST_CACHE, paired_bootstrap, write_report
from search.report.pareto import choose_best

pytestmark = pytest.mark.slow  # trains (or reuses) the demo family and runs searches

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def zoo():
    return demo.build_zoo(ROOT / demo.DEFAULT_ZOO_DIR)


def run(config_name: str, tmp_path_factory, **updates):
    """Search and report one of the demo configs in a fresh directory; returns (config, study, run dir)."""
    run_dir = tmp_path_factory.mktemp(config_name)
    config = load_search_config(ROOT / "configs" / f"{config_name}.yaml")
    config = config.model_copy(update={"output_dir": str(run_dir), "include_path": str(ROOT / "configs" / "tasks"),
                                       **updates})
    study = search(config, config_dir=ROOT, progress=False)
    write_report(run_dir, storage=config.storage_url, study_name=config.study)
    return config, study, run_dir


def _test_split_scores(run_dir: Path, trial) -> Scores:
    """A trial's test-split scores as the report cached them."""
    cache = json.loads((run_dir / TEST_CACHE).read_text())
    return Scores.from_dict(next(v for k, v in cache.items() if k.startswith(f"trial {trial.number}@")))


def best_trial(study, config):
    ranked = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=rank_key)
    return choose_best(ranked, config)[0][0]


@pytest.fixture(scope="module")
def single(zoo, tmp_path_factory):
    return run("demo", tmp_path_factory)


@pytest.fixture(scope="module")
def two_objectives(zoo, tmp_path_factory):
    return run("demo_no_regression", tmp_path_factory, constraints=[], name="two_objectives")


@pytest.fixture(scope="module")
def constrained(zoo, tmp_path_factory):
    return run("demo_no_regression", tmp_path_factory)


def test_the_two_objective_fronts_best_average_is_no_worse_than_the_single_objective_best(single, two_objectives):
    so_config, so_study, _ = single
    mo_config, mo_study, run_dir = two_objectives
    so_best, mo_best = best_trial(so_study, so_config), best_trial(mo_study, mo_config)
    so_scores, mo_scores = (Scores.from_dict(t.user_attrs["scores"]) for t in (so_best, mo_best))
    low, high = paired_bootstrap(mo_scores, so_scores, so_config)
    assert high >= 0, (mo_best.user_attrs["average"], so_best.value, low, high)
    low, high = paired_bootstrap(_test_split_scores(run_dir, mo_best), _test_split_scores(single[2], so_best),
                                 so_config)
    assert high >= 0, ("test split", low, high)
    front = yaml.safe_load((run_dir / "best_recipe.yaml").read_text())["evomerge"]["trial"]
    assert front == mo_best.number
    pareto = sorted((run_dir / "recipes" / "pareto").glob("trial*.yaml"))
    assert f"trial{mo_best.number}.yaml" in {p.name for p in pareto}
    for path in pareto:
        assert load_recipe(path).merge_method == "ties"
    assert (run_dir / "plots" / "pareto.png").stat().st_size > 10_000


def test_every_task_at_least_its_best_source_minus_002_holds_on_the_test_split(constrained):
    config, study, run_dir = constrained
    best = best_trial(study, config)
    assert best.user_attrs["feasible"] is True
    section = (run_dir / "leaderboard.md").read_text().split("## Constraints on the test split (best recipe)")[1]
    rows = [line.split(" | ") for line in section.split("\n## ")[0].splitlines() if line.startswith("| zoo_")]
    assert len(rows) == 3, rows  # "every" expands to the three tasks
    for cells in rows:
        assert "≥ best_source (" in cells[0] and "− 0.02" in cells[0]
        assert float(cells[4]) >= 0 and cells[6].startswith("holds"), cells
    report = (run_dir / "report.html").read_text()
    assert "satisfy every constraint on the search split" in report
    infeasible = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if not t.user_attrs["feasible"]]
    assert infeasible and all(t.constraints and max(t.constraints.values()) > 0 for t in infeasible)


def test_a_bits_per_byte_objective_is_minimized_and_the_report_shows_bits_per_byte(zoo, tmp_path_factory):
    config, study, run_dir = run("demo_perplexity", tmp_path_factory)
    rows = list(csv.DictReader((run_dir / "leaderboard.csv").open()))
    column = "zoo_text bits_per_byte (search)"
    best = next(r for r in rows if r["role"].startswith("best"))
    sources = [float(r[column]) for r in rows if r["role"] == "source"]
    handwritten = next(r for r in rows if "hand-written" in r["role"])
    assert float(best[column]) <= min(sources) + 1e-9
    assert float(best[column]) < float(handwritten[column])
    report = (run_dir / "report.html").read_text()
    assert "zoo_text bits_per_byte" in report and "2^-bits_per_byte" in report
    assert f"zoo_text bits_per_byte {float(best[column]):.4g}" in report  # the best line names the metric itself


def test_a_method_list_search_picks_a_method_and_explains_why(zoo, tmp_path_factory):
    config, study, run_dir = run("demo_methods", tmp_path_factory)
    tried = {t.params["method"] for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert tried == {"task_arithmetic", "ties", "dare_ties"}
    assert all("density[rev]" not in t.params for t in study.get_trials(states=(TrialState.COMPLETE,))
               if t.params["method"] == "task_arithmetic")
    winner = load_recipe(run_dir / "best_recipe.yaml").merge_method
    section = (run_dir / "leaderboard.md").read_text().split("## Method rationale")[1].split("\n## ")[0]
    assert f"{winner} won with trial" in section
    for method in config.methods:
        assert f"| {method} |" in section
    best = best_trial(study, config)
    assert best.value >= max(b["objective"] for b in study.user_attrs["baselines"].values()) + 0.15
