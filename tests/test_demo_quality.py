"""The product's promise on the demo family: the search finds a merge far better than any source model and
better than the recipe a user would write by hand, and the gain holds on the held-out test split."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from optuna.trial import TrialState

from search import zoo
from search.config import load_search_config
from search.loop import search
from search.report import write_report

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    zoo.build_zoo(ROOT / zoo.DEFAULT_ZOO_DIR)
    run_dir = tmp_path_factory.mktemp("demo")
    config = load_search_config(ROOT / "configs" / "demo.yaml")
    config = config.model_copy(update={"output_dir": str(run_dir), "include_path": str(ROOT / "configs" / "tasks")})
    study = search(config, config_dir=ROOT, progress=False)
    report = write_report(run_dir, storage=config.storage_url, study_name=config.study)
    return study, run_dir, report


def test_best_of_at_most_60_trials_beats_every_source_by_015_and_the_handwritten_recipe(demo_run):
    study, _, _ = demo_run
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) <= 60
    handwritten = next(t for t in complete if t.user_attrs.get("handwritten"))
    sources = {k: v["objective"] for k, v in study.user_attrs["baselines"].items()}
    assert study.best_value >= max(sources.values()) + 0.15, (study.best_value, sources)
    assert study.best_value > handwritten.value, (study.best_value, handwritten.value)


def test_the_gain_holds_on_the_test_split_in_the_leaderboard(demo_run):
    _, run_dir, report = demo_run
    assert report.is_file()
    rows = {row["role"]: row for row in csv.DictReader((run_dir / "leaderboard.csv").open())}
    test_average = [k for k in rows["best"] if k.startswith("average") and "test" in k][0]
    best_source = max(float(r[test_average]) for r in csv.DictReader((run_dir / "leaderboard.csv").open())
                      if r["role"] == "source")
    assert float(rows["best"][test_average]) >= best_source + 0.15, rows["best"]
    assert (run_dir / "best_recipe.yaml").is_file()
