"""Searches and reports scored by perplexity: a tiny word-level Llama family on a ``loglikelihood_rolling``
fixture task (tests/fixtures/tasks/fx_text.yaml), and leaderboards of hand-made scores whose every number
can be checked by hand. Also: validate and search agree on which metrics can enter the objective, and a
rerun with an edited config stops instead of mixing objectives."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from evaluators import LmEvalEvaluator, Scores, TaskScore, weighted_average
from evaluators.base import corpus_probability
from merge_core.errors import EvomergeError
from search.cli import main
from search.config import SearchConfig
from search.loop import config_differences, progress_status, search
from search.report import Row, display_frame, leaderboard_frame, paired_bootstrap, write_report
from tests.test_evaluators import FIXTURE_TASKS, make_noisy_family

ENV = {"include_path": str(FIXTURE_TASKS), "batch_size": 8}


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """A random tiny Llama base and two fine-tunes (base + noise), with the fixture tasks' word tokenizer."""
    return make_noisy_family(tmp_path_factory.mktemp("ppl-family"), 0.3)


def config_dict(fam, run_dir, metric="byte_perplexity", **extra) -> dict:
    return {"name": "ppl", "base_model": fam["base"], "models": [fam["ft1"], fam["ft2"]], "method": "linear",
            "parameters": {"weight": {"low": 0.0, "high": 1.0}}, "tasks": [{"name": "fx_text", "metric": metric}],
            "sampler": "random", "n_trials": 2, "output_dir": str(run_dir), **ENV, **extra}


def write_config(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def ppl_scores(log_likelihoods, units, task="txt", metric="byte_perplexity") -> Scores:
    """A corpus-level task as lm-eval reports it: exp(-Σ ll / Σ units), per-document ll and units kept."""
    value = math.exp(-sum(log_likelihoods) / sum(units))
    return Scores({task: TaskScore({metric: value}, {metric: False}, {metric: list(map(float, log_likelihoods))},
                                   len(units), {metric: list(map(float, units))})})


PPL_CONFIG = SearchConfig.model_validate({"base_model": "b", "models": ["x"],
                                          "parameters": {"weight": {"low": 0, "high": 1}}, "tasks": [{"name": "txt"}]})


# --- objective ---------------------------------------------------------------------------------------

def test_bits_per_byte_enters_the_objective_as_two_to_the_minus_bits_like_one_over_byte_perplexity():
    scores = Scores({"t": TaskScore({"bits_per_byte": 1.5, "byte_perplexity": 2 ** 1.5, "brier_score": 0.2},
                                    {"bits_per_byte": False, "byte_perplexity": False, "brier_score": False})})
    assert weighted_average(scores, {"t": 1}, {"t": "bits_per_byte"}) == pytest.approx(2 ** -1.5)
    assert weighted_average(scores, {"t": 1}, {"t": "byte_perplexity"}) == pytest.approx(2 ** -1.5)
    with pytest.raises(EvomergeError, match=r"'brier_score' is lower-is-better and has no higher-is-better form"):
        weighted_average(scores, {"t": 1}, {"t": "brier_score"})


# --- lm-eval's loglikelihood_rolling tasks -----------------------------------------------------------

def test_rolling_task_keeps_each_documents_log_likelihood_and_units_which_recompute_lm_evals_values(fam, capfd):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    evaluator = LmEvalEvaluator(["fx_text"], include_path=FIXTURE_TASKS, split="search", batch_size=4)
    capfd.readouterr()
    score = evaluator.score(AutoModelForCausalLM.from_pretrained(fam["ft1"]),
                            AutoTokenizer.from_pretrained(fam["ft1"])).tasks["fx_text"]
    assert "loglikelihood" not in capfd.readouterr().err  # lm-eval's per-batch progress bars stay off
    texts = [line["text"] for line in map(yaml.safe_load, (FIXTURE_TASKS / "text" / "fx_text_search.jsonl").open())]
    assert score.n == len(texts) == 6
    assert score.counts["byte_perplexity"] == [len(t.encode()) for t in texts]
    assert score.counts["word_perplexity"] == [len(t.split()) for t in texts]
    ll = np.array(score.samples["byte_perplexity"])
    assert (ll < 0).all() and score.samples["word_perplexity"] == score.samples["bits_per_byte"] == list(ll)
    for metric in ("byte_perplexity", "word_perplexity"):
        assert 1 / score.metrics[metric] == pytest.approx(corpus_probability(ll, score.counts[metric]))
    assert 2 ** -score.metrics["bits_per_byte"] == pytest.approx(corpus_probability(ll, score.counts["bits_per_byte"]))


# --- the leaderboard, by hand ------------------------------------------------------------------------

BYTES = [10, 20, 30, 40]


def rows_by_hand() -> list[Row]:
    """Every document has the same log-likelihood per byte within a model, so 1/byte_perplexity is
    exp(-rate) and every bootstrap resample gives the same difference: the CI is the point difference."""
    def model(rate):
        return ppl_scores([-rate * b for b in BYTES], BYTES)

    return [Row("base", "base", model(1.5), model="b"), Row("ft1", "source", model(1.6), model="x"),
            Row("trial 0", "hand-written", model(1.49), trial=SimpleNamespace(number=0)),
            Row("trial 1", "best", model(2.3), trial=SimpleNamespace(number=1))]


def test_differences_are_taken_against_the_base_when_it_beats_every_source():
    frame = leaderboard_frame(rows_by_hand(), PPL_CONFIG).set_index("model")
    assert frame.attrs["reference"] == "base (base)"
    assert frame["txt byte_perplexity (search)"].tolist() == pytest.approx(
        [math.exp(1.5), math.exp(1.6), math.exp(1.49), math.exp(2.3)])
    assert frame["average (search)"].tolist() == pytest.approx(
        [math.exp(-1.5), math.exp(-1.6), math.exp(-1.49), math.exp(-2.3)])
    delta = math.exp(-1.49) - math.exp(-1.5)  # 0.0022424: not the +0.0235 it gains over the best fine-tune
    assert frame.loc["trial 0", "Δ vs base (search)"] == pytest.approx(delta)
    assert frame.loc["trial 0", ["Δ CI low (search)", "Δ CI high (search)"]].tolist() == pytest.approx([delta, delta])
    assert frame.loc["ft1", "Δ vs base (search)"] == pytest.approx(math.exp(-1.6) - math.exp(-1.5))


def test_a_merge_whose_perplexity_exceeds_twice_the_best_start_models_is_flagged():
    frame = leaderboard_frame(rows_by_hand(), PPL_CONFIG).set_index("model")
    # e^2.3 = 9.97 > 2 e^1.5 = 8.96; e^1.6 = 4.95 is worse than the base but not broken
    assert frame["flag"].to_dict() == {"base": "", "ft1": "", "trial 0": "",
                                       "trial 1": "txt perplexity > 2× best source (search)"}


def test_displayed_scores_have_the_decimals_that_separate_rows_and_two_significant_digits_of_each_difference():
    rows = rows_by_hand()
    rows[2] = Row("trial 0", "hand-written", ppl_scores([-1.5001 * b for b in BYTES], BYTES), trial=rows[2].trial)
    shown = display_frame(leaderboard_frame(rows, PPL_CONFIG)).set_index("model")
    # 1/ppl: base e^-1.5 = 0.2231302, trial 0 e^-1.5001 = 0.2231079: 5 decimals tell them apart
    assert shown.loc["base", "average (search)"] == "0.22313"
    assert shown.loc["trial 0", "average (search)"] == "0.22311"
    # the smallest nonzero difference, -0.0000223, needs 6 decimals for two significant digits
    assert shown.loc["trial 0", "Δ vs base (search) [95% CI]"] == "-0.000022 [-0.000022, -0.000022]"
    assert shown.loc["base", "Δ vs base (search) [95% CI]"] == "+0.000000 [+0.000000, +0.000000]"


def test_corpus_level_ci_resamples_documents_and_recomputes_the_ratio_of_sums():
    # Two documents: resampled twice, doc 0 appears k = 2, 1, 0 times with probability 1/4, 1/2, 1/4.
    # k = 2: both models have 10/10 bytes at -1 nat/byte: difference 0 (the 2.5% percentile);
    # k = 0: e^(-90/50) - e^(-100/50) = 0.029964 (the 97.5% percentile). The point difference is k = 1's.
    a, b = ppl_scores([-10, -90], [10, 50]), ppl_scores([-10, -100], [10, 50])
    low, high = paired_bootstrap(a, b, PPL_CONFIG)
    assert (low, high) == pytest.approx((0.0, math.exp(-1.8) - math.exp(-2.0)))
    frame = leaderboard_frame([Row("base", "base", b, model="b"), Row("trial 0", "best", a,
                                                                     trial=SimpleNamespace(number=0))], PPL_CONFIG)
    assert frame["Δ vs base (search)"].iloc[1] == pytest.approx(math.exp(-100 / 60) - math.exp(-110 / 60))


def test_a_lower_is_better_metric_without_units_has_no_ci_and_says_so():
    scores = Scores({"txt": TaskScore({"byte_perplexity": 3.0}, {"byte_perplexity": False})})
    frame = leaderboard_frame([Row("base", "base", scores, model="b"),
                               Row("trial 0", "best", scores, trial=SimpleNamespace(number=0))], PPL_CONFIG)
    assert display_frame(frame)["Δ vs base (search) [95% CI]"].tolist() == ["+0.000 (no CI)"] * 2


def test_progress_shows_the_best_its_difference_to_the_best_start_model_and_enough_decimals():
    done = [SimpleNamespace(state=TrialState.COMPLETE, values=[v], user_attrs={}) for v in (0.16113, 0.15871)]
    last = SimpleNamespace(state=TrialState.COMPLETE, values=[0.15871], number=7, user_attrs={})
    assert progress_status(done, last, (0.15993, "base")) == "best 0.161 (+0.0012 vs base 0.160) · trial 7: 0.159"
    done = [SimpleNamespace(state=TrialState.COMPLETE, values=[v], user_attrs={}) for v in (0.16113, 0.16108)]
    last = SimpleNamespace(state=TrialState.COMPLETE, values=[0.16108], number=8, user_attrs={})
    assert progress_status(done, last, (0.16112, "base")) == (
        "best 0.16113 (+0.000010 vs base 0.16112) · trial 8: 0.16108")


# --- validate and search agree ------------------------------------------------------------------------

def test_validate_accepts_bits_per_byte_and_refuses_what_search_refuses_before_any_scoring(fam, tmp_path, capsys):
    ok = write_config(tmp_path / "ok.yaml", config_dict(fam, tmp_path / "ok", metric="bits_per_byte"))
    assert main(["validate", ok]) == 0
    bad = config_dict(fam, tmp_path / "bad", metric=None,
                      tasks=[{"name": "fx_text", "metric": "bits_per_byte"},
                             {"name": "fx_pick", "metric": "brier_score"}])
    bad_path = write_config(tmp_path / "bad.yaml", bad)
    capsys.readouterr()
    for command in ("validate", "search"):
        assert main([command, bad_path, "--quiet"] if command == "search" else [command, bad_path]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers' loading bars may precede it)
        assert err.startswith(f"evomerge {command}: error: ")
        assert "task 'fx_pick': metric 'brier_score' is lower-is-better" in err
    assert not (tmp_path / "bad" / "study.db").exists()
    bad["tasks"] = [{"name": "fx_text", "metric": "acc"}]
    assert main(["validate", write_config(tmp_path / "bad2.yaml", bad)]) == 2
    assert "tasks[0].metric: task 'fx_text' does not produce metric 'acc' (it produces: byte_perplexity, " \
        "word_perplexity, bits_per_byte)" in capsys.readouterr().err


# --- a perplexity-scored search, its report, and reruns -----------------------------------------------

def test_perplexity_search_reports_cis_against_the_best_start_model(fam, tmp_path):
    config = SearchConfig.model_validate(config_dict(fam, tmp_path, n_trials=3))
    study = search(config, progress=False)
    write_report(tmp_path)
    table = pd.read_csv(tmp_path / "leaderboard.csv").set_index("model")
    baselines = study.user_attrs["baselines"]
    best_start = max((b["objective"], label) for label, b in baselines.items())[1]
    for split in ("search", "test"):
        delta = table[f"Δ vs {best_start} ({split})"]
        low, high = table[f"Δ CI low ({split})"], table[f"Δ CI high ({split})"]
        assert low.notna().all() and ((low <= delta + 1e-12) & (delta <= high + 1e-12)).all()
        assert table.loc[best_start, f"Δ vs {best_start} ({split})"] == 0
    for label, b in baselines.items():
        assert table.loc[label, "fx_text byte_perplexity (search)"] == b["scores"]["tasks"]["fx_text"]["metrics"][
            "byte_perplexity"]
        perplexity = table.loc[label, "fx_text byte_perplexity (search)"]
        assert table.loc[label, "average (search)"] == pytest.approx(1 / perplexity)
    page = (tmp_path / "report.html").read_text()
    assert "the best of the base and the sources" in page and "ratio of sums" in page


def test_a_rerun_with_an_edited_metric_stops_naming_the_field_and_budget_changes_continue(fam, tmp_path, capsys):
    data = config_dict(fam, tmp_path / "run")
    path = write_config(tmp_path / "c.yaml", data)
    assert main(["search", path, "--quiet", "--no-report"]) == 0
    db = tmp_path / "run" / "study.db"
    before = db.read_bytes()

    edited = write_config(tmp_path / "c.yaml", {**data, "tasks": [{"name": "fx_text", "metric": "bits_per_byte"}]})
    capsys.readouterr()
    for command in ("search", "validate"):
        assert main([command, edited, "--quiet"] if command == "search" else [command, edited]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers' loading bars may precede it)
        assert err.startswith(f"evomerge {command}: error: ") and re.search(
            r'another config \(tasks\[0\]\.metric: "byte_perplexity" → "bits_per_byte"\): give --new-study', err), err
    assert db.read_bytes() == before

    write_config(tmp_path / "c.yaml", {**data, "n_trials": 3, "threads": 1})
    assert main(["search", path, "--quiet", "--no-report"]) == 0
    study = optuna.load_study(study_name="ppl", storage=f"sqlite:///{db}")
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3


def test_continue_anyway_replaces_the_stored_config_and_new_study_sets_the_old_one_aside(fam, tmp_path, capsys):
    data = config_dict(fam, tmp_path / "run")
    path = write_config(tmp_path / "c.yaml", data)
    assert main(["search", path, "--quiet", "--no-report"]) == 0
    storage = f"sqlite:///{tmp_path / 'run' / 'study.db'}"

    write_config(tmp_path / "c.yaml",
                 {**data, "n_trials": 3, "tasks": [{"name": "fx_text", "metric": "bits_per_byte"}]})
    assert main(["search", path, "--quiet", "--continue-anyway"]) == 0
    study = optuna.load_study(study_name="ppl", storage=storage)
    assert study.user_attrs["config"]["tasks"][0]["metric"] == "bits_per_byte"
    history = study.user_attrs["config_history"]
    assert [h["config"]["tasks"][0]["metric"] for h in history] == ["byte_perplexity"]
    assert history[0]["changes"] == ['tasks[0].metric: "byte_perplexity" → "bits_per_byte"']
    base = study.user_attrs["baselines"]["base"]
    assert base["objective"] == pytest.approx(2 ** -base["scores"]["tasks"]["fx_text"]["metrics"]["bits_per_byte"])
    assert "fx_text bits_per_byte (search)" in pd.read_csv(tmp_path / "run" / "leaderboard.csv").columns

    write_config(tmp_path / "c.yaml", {**data, "n_trials": 1, "method": "task_arithmetic"})
    capsys.readouterr()
    assert main(["search", path, "--quiet", "--no-report", "--new-study"]) == 0
    moved = re.search(r"previous study moved to (\S+)", capsys.readouterr().out).group(1)
    old = optuna.load_study(study_name="ppl", storage=f"sqlite:///{moved}")
    assert len(old.get_trials(states=(TrialState.COMPLETE,))) == 3
    new = optuna.load_study(study_name="ppl", storage=storage)
    assert new.user_attrs["config"]["method"] == "task_arithmetic" and "config_history" not in new.user_attrs
    assert len(new.get_trials(states=(TrialState.COMPLETE,))) == 1


def test_only_fields_that_change_the_objective_or_the_space_count_as_config_changes(fam, tmp_path):
    stored = SearchConfig.model_validate(config_dict(fam, tmp_path)).model_dump(mode="json")
    budget = SearchConfig.model_validate(config_dict(fam, tmp_path / "elsewhere", n_trials=50, timeout=60, threads=2,
                                                     batch_size=4, device="cuda", sampler="tpe", name="other"))
    assert config_differences(stored, budget) == []
    space = SearchConfig.model_validate(config_dict(fam, tmp_path, limit=3, seed=1, dtype="bfloat16",
                                                    parameters={"weight": {"low": 0.0, "high": 2.0}}))
    assert config_differences(stored, space) == ["dtype: \"float32\" → \"bfloat16\"",
                                                 "parameters.weight.high: 1.0 → 2.0", "limit: null → 3", "seed: 0 → 1"]


# --- held-out perplexity texts, constraints, the relative scale ---------------------------------------

def _text_file(path, split: str):
    rows = (FIXTURE_TASKS / "text" / f"fx_text_{split}.jsonl").read_text().splitlines()
    path.write_text(" . ".join(json.loads(r)["text"] for r in rows) + "\n")
    return str(path)


def test_a_held_out_perplexity_bound_of_11_times_the_best_source_is_a_constraint_checked_on_both_splits(fam, tmp_path):
    data = config_dict(fam, tmp_path / "run", n_trials=4, sampler="tpe",
                       perplexity=[{"name": "held", "text": _text_file(tmp_path / "search.txt", "search"),
                                    "test_text": _text_file(tmp_path / "test.txt", "test"), "context_length": 8,
                                    "max_tokens": 64}],
                       constraints=[{"task": "held", "no_worse_than": "best_source", "ratio": 1.1}])
    config = SearchConfig.model_validate(data)
    study = search(config, progress=False)
    baselines = study.user_attrs["baselines"]
    sources = {label: b["scores"]["tasks"]["held"]["metrics"]["perplexity"] for label, b in baselines.items()
               if not b["is_base"]}
    best_source = min(sources.values())
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        ppl = trial.user_attrs["scores"]["tasks"]["held"]["metrics"]["perplexity"]
        assert trial.constraints == {"0": pytest.approx(ppl - 1.1 * best_source)}
        assert trial.user_attrs["feasible"] == (ppl <= 1.1 * best_source)
    write_report(tmp_path / "run")
    text = (tmp_path / "run" / "leaderboard.md").read_text()
    section = text.split("## Constraints on the test split (best recipe)")[1].split("\n## ")[0]
    best_label = min(sources, key=sources.get)
    assert f"| held perplexity ≤ best_source ({best_label}) × 1.1 |" in section
    assert "held perplexity (test)" in text  # the held-out text is scored on its test text too


def test_brier_score_averaged_with_perplexity_validates_on_the_relative_scale(fam, tmp_path, capsys):
    data = config_dict(fam, tmp_path / "run", metric=None, objective_scale="relative",
                       tasks=[{"name": "fx_text", "metric": "bits_per_byte"},
                              {"name": "fx_pick", "metric": "brier_score"}])
    assert main(["validate", write_config(tmp_path / "c.yaml", data)]) == 0
    assert main(["validate", write_config(tmp_path / "d.yaml", {**data, "objective_scale": "raw"})]) == 2
    assert "(or set objective_scale: relative)" in capsys.readouterr().err
