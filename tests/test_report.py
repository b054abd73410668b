"""The search report on small random families with a cheap, exact, split-aware evaluator: reproducible best
recipe (evomerge and mergekit), leaderboard and CIs, plots, test-split cache, read-only storage, bad input."""

from __future__ import annotations

import math
import re
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml
from optuna.trial import TrialState
from safetensors.torch import load_file

from evaluators import Scores, TaskScore
from search.cli import main
from search.config import SearchConfig
from search.loop import objective_of, open_workbench, search
from search.report import TEST_CACHE, paired_bootstrap, write_report
from tests.families import make_family

TARGET = (0.9, 0.2)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return {k: str(v) for k, v in make_family(tmp_path_factory.mktemp("report"), "llama", n_finetunes=2).items()}


class ClosenessEvaluator:
    """Two tasks (attention tensors, the rest); one "document" per tensor, valued by its closeness to a known
    task-arithmetic target (1 = identical). The search and test splits are disjoint halves of the tensors."""

    def __init__(self, fam, split: str = "search"):
        from transformers import AutoModelForCausalLM

        base, a, b = (AutoModelForCausalLM.from_pretrained(fam[k]).state_dict() for k in ("base", "ft1", "ft2"))
        self.target = {n: base[n] + TARGET[0] * (a[n] - base[n]) + TARGET[1] * (b[n] - base[n]) for n in base}
        self.scale = {n: (((a[n] - base[n]) ** 2).sum() + ((b[n] - base[n]) ** 2).sum()).item() for n in base}
        names = sorted(base)[split == "test"::2]
        self.docs = {"attn": [n for n in names if "self_attn" in n], "rest": [n for n in names if "self_attn" not in n]}
        self.calls = 0

    def score(self, model, tokenizer) -> Scores:
        self.calls += 1
        state = model.state_dict()
        tasks = {}
        for task, names in self.docs.items():
            values = [math.exp(-((state[n] - self.target[n]) ** 2).sum().item() / self.scale[n]) for n in names]
            tasks[task] = TaskScore({"acc": sum(values) / len(values)}, {"acc": True}, {"acc": values}, len(values))
        return Scores(tasks, 0.0)


class RefusingEvaluator:
    def score(self, model, tokenizer):
        raise AssertionError("the cache should have answered")


def config_for(fam, run_dir, **extra) -> SearchConfig:
    return SearchConfig.model_validate({
        "name": "r", "base_model": fam["base"], "models": [fam["ft1"], fam["ft2"]], "method": "task_arithmetic",
        "parameters": {"weight": {"low": 0.0, "high": 1.5}}, "tasks": [{"name": "attn"}, {"name": "rest", "weight": 2}],
        "n_trials": 20, "output_dir": str(run_dir), **extra})


@pytest.fixture(scope="module")
def run(fam, tmp_path_factory):
    """A finished task-arithmetic search and its report (test split scored by the fake evaluator)."""
    run_dir = tmp_path_factory.mktemp("run")
    config = config_for(fam, run_dir)
    study = search(config, evaluator=ClosenessEvaluator(fam), progress=False)
    report = write_report(run_dir, evaluator=ClosenessEvaluator(fam, "test"))
    return {"dir": run_dir, "config": config, "study": study, "report": report}


def weights_of(path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def evaluated_weights(config, fam, recipe) -> dict[str, torch.Tensor]:
    """The live model's state right after the search's own materialization of ``recipe``."""
    bench = open_workbench(config, evaluator=ClosenessEvaluator(fam))
    bench.materialize(recipe)
    return {n: t.clone() for n, t in bench.model.state_dict().items()}


def test_stochastic_best_recipe_merged_by_evomerge_equals_the_evaluated_weights_and_rescores_the_same(fam, tmp_path):
    from transformers import AutoModelForCausalLM

    config = config_for(fam, tmp_path, method="dare_ties", seed=7, n_trials=4, fixed={"density": 0.6})
    study = search(config, evaluator=ClosenessEvaluator(fam), progress=False)
    write_report(tmp_path, test=False)
    recipe = yaml.safe_load((tmp_path / "best_recipe.yaml").read_text())
    assert recipe["evomerge"] == {"version": recipe["evomerge"]["version"], "seed": 7, "study": "r",
                                  "trial": study.best_trial.number, "objective": study.best_value,
                                  "storage": f"sqlite:///{tmp_path}/study.db"}

    assert main(["merge", str(tmp_path / "best_recipe.yaml"), str(tmp_path / "out"), "--quiet"]) == 0
    merged = weights_of(tmp_path / "out")
    expected = evaluated_weights(config, fam, study.best_trial.user_attrs["recipe"])
    assert merged.keys() == expected.keys()
    for name, tensor in merged.items():
        assert torch.equal(tensor, expected[name]), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    rescored = objective_of(ClosenessEvaluator(fam).score(model, None), config)
    assert rescored == pytest.approx(study.best_value, abs=1e-12)


def test_mergekit_merges_best_recipe_yaml_to_the_evaluated_weights(fam, run, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    recipe = yaml.safe_load((run["dir"] / "best_recipe.yaml").read_text())
    run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    merged = weights_of(tmp_path / "mk")
    expected = evaluated_weights(run["config"], fam, run["study"].best_trial.user_attrs["recipe"])
    assert merged.keys() == expected.keys()
    for name, tensor in merged.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0)


def test_best_recipe_yaml_names_its_study_and_trial_in_a_comment_header(run):
    text = (run["dir"] / "best_recipe.yaml").read_text()
    best = run["study"].best_trial
    assert text.startswith(f"# evomerge recipe #1 of study 'r': trial {best.number}")
    assert "evomerge merge best_recipe.yaml OUT_DIR" in text.splitlines()[1]
    recipe = yaml.safe_load(text)
    assert recipe["dtype"] == "float32" and recipe["base_model"] == run["config"].base_model


def test_leaderboard_rows_are_base_sources_handwritten_and_top_trials_with_task_and_split_columns(run):
    table = pd.read_csv(run["dir"] / "leaderboard.csv")
    study = run["study"]
    ranked = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: (-t.value, t.number))
    top = [f"trial {t.number}" for t in ranked[:3]]
    assert list(table["model"]) == ["base", "ft1", "ft2", "trial 0", *top]
    assert list(table["role"])[:4] == ["base", "source", "source", "hand-written"]
    assert list(table["role"])[4:] == ["best", "top 2", "top 3"]
    for split in ("search", "test"):
        for column in (f"attn acc ({split})", f"rest acc ({split})", f"average ({split})"):
            assert column in table.columns
    baselines = study.user_attrs["baselines"]
    assert table.set_index("model").loc["ft1", "average (search)"] == pytest.approx(baselines["ft1"]["objective"])
    assert table.set_index("model").loc[top[0], "average (search)"] == pytest.approx(study.best_value)
    assert table["average (test)"].between(0, 1).all() and not table["average (test)"].equals(table["average (search)"])


def test_differences_to_the_best_start_model_have_cis_around_them_and_zero_for_that_model_itself(run):
    table = pd.read_csv(run["dir"] / "leaderboard.csv").set_index("model")
    baselines = run["study"].user_attrs["baselines"]
    best_source = max((b["objective"], label) for label, b in baselines.items())[1]
    for split in ("search", "test"):
        delta, low, high = (table[f"Δ vs {best_source} ({split})"], table[f"Δ CI low ({split})"],
                            table[f"Δ CI high ({split})"])
        assert ((low <= delta + 1e-12) & (delta <= high + 1e-12)).all()
        assert (delta.loc[best_source], low.loc[best_source], high.loc[best_source]) == (0, 0, 0)
    best = f"trial {run['study'].best_trial.number}"
    assert table.loc[best, "Δ CI low (search)"] > 0  # the search beats every source on the closeness target


def test_paired_bootstrap_follows_the_per_document_difference(run):
    config = run["config"]

    def scores(attn, rest):
        return Scores({name: TaskScore({"acc": sum(v) / len(v)}, {"acc": True}, {"acc": v}, len(v))
                       for name, v in (("attn", attn), ("rest", rest))})

    a = scores([0.2, 0.9, 0.5, 0.1], [1.0, 0.0, 1.0])
    assert paired_bootstrap(a, a, config) == (0.0, 0.0)
    shifted = scores(*([x + 0.1 for x in a.tasks[task].samples["acc"]] for task in ("attn", "rest")))
    assert paired_bootstrap(shifted, a, config) == pytest.approx((0.1, 0.1))
    assert all(math.isnan(x) for x in paired_bootstrap(scores([1, 0], [1.0]), a, config))


def test_leaderboard_markdown_shows_every_row_with_differences_and_cis(run):
    text = (run["dir"] / "leaderboard.md").read_text()
    lines = text.split("\n## ")[0].splitlines()  # the leaderboard, before the report's other sections
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 7
    assert "attn acc (search)" in table[0] and "[95% CI]" in table[0] and "average (test)" in table[0]
    ft_row = next(line for line in table if line.startswith("| ft"))
    assert re.search(r"\| \+0\.0{3,} \[\+0\.0{3,}, \+0\.0{3,}\] \|", ft_row)


def test_report_lists_each_source_with_its_architecture_parameter_count_and_weights_hash(run):
    import hashlib

    inventory = (run["dir"] / "leaderboard.md").read_text().split("\n## Source models\n")[1]
    rows = [line.split(" | ") for line in inventory.splitlines() if line.startswith(("| ft", "| base"))]
    assert len(rows) == 3
    for cells in rows:
        path = Path(cells[2])
        digest = hashlib.sha256(b"model.safetensors\0" + (path / "model.safetensors").read_bytes()).hexdigest()
        assert cells[6] == digest[:16]
        assert cells[4] == "LlamaForCausalLM" and int(cells[5].replace(",", "")) > 1000


def test_plots_are_nonempty_pngs_embedded_in_the_html(run):
    plots = run["dir"] / "plots"
    for name in ("history", "tasks", "layers", "importances"):
        data = (plots / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name
    page = run["report"].read_text()
    assert run["report"] == run["dir"] / "report.html"
    assert page.count("data:image/png;base64,") == 4 and "<table" in page


def test_layer_profile_holds_the_best_recipes_weights_in_every_layer(run):
    from search.report import layer_profile

    best = run["study"].best_trial
    profile = layer_profile(best.user_attrs["recipe"], run["config"])
    assert set(profile["model"]) == {"ft1", "ft2"} and list(profile["layer"].unique()) == [0, 1, 2, 3]
    for label in ("ft1", "ft2"):
        weight = best.params[f"weight[{label}]"]
        assert profile[profile["model"] == label]["mean"].tolist() == pytest.approx([weight] * 4)


def test_test_split_scores_are_cached_by_row_and_recipe(fam, run):
    cache = yaml.safe_load((run["dir"] / TEST_CACHE).read_text())
    assert {key.split("@")[0] for key in cache} >= {"base", "ft1", "ft2", "trial 0"}
    write_report(run["dir"], evaluator=RefusingEvaluator())


def test_top_k_recipes_and_merge_write_the_best_model_with_the_leaderboard_in_its_card(fam, run, tmp_path):
    report = write_report(run["dir"], top_k=5, merge=True, test=False)
    ranked = sorted(run["study"].get_trials(states=(TrialState.COMPLETE,)), key=lambda t: (-t.value, t.number))
    exported = sorted(p.name for p in (run["dir"] / "recipes").glob("*.yaml"))
    assert exported == sorted(f"rank{i}_trial{t.number}.yaml" for i, t in enumerate(ranked[:5], start=1))
    card = (run["dir"] / "best_model" / "README.md").read_text()
    assert "## Leaderboard" in card and "| trial 0 |" in card
    assert "(test)" not in pd.read_csv(run["dir"] / "leaderboard.csv").columns.str.cat()
    merged = weights_of(run["dir"] / "best_model")
    expected = evaluated_weights(run["config"], fam, ranked[0].user_attrs["recipe"])
    assert all(torch.equal(merged[n], expected[n]) for n in merged)
    write_report(run["dir"], evaluator=RefusingEvaluator())  # leave the module's report as it was
    assert report.is_file()


def test_report_on_a_running_study_changes_nothing_in_the_storage(fam, tmp_path):
    config = config_for(fam, tmp_path, n_trials=3)
    search(config, evaluator=ClosenessEvaluator(fam), progress=False)
    study = optuna.load_study(study_name="r", storage=config.storage_url)
    study.ask()  # a trial in progress, as while a worker evaluates it
    db = tmp_path / "study.db"
    before = db.read_bytes()
    write_report(tmp_path, evaluator=ClosenessEvaluator(fam, "test"))
    assert db.read_bytes() == before
    states = [t.state for t in optuna.load_study(study_name="r", storage=config.storage_url).trials]
    assert states == [TrialState.COMPLETE] * 3 + [TrialState.RUNNING]
    assert "still running" in (tmp_path / "report.html").read_text()


def test_cli_report_prints_where_the_report_is(run, capsys):
    assert main(["report", str(run["dir"]), "--no-test", "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert f"report: {run['dir'] / 'report.html'}" in out
    write_report(run["dir"], evaluator=RefusingEvaluator())


def test_report_without_a_study_is_one_line_exit_2_and_creates_nothing(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no study here" in err
    assert list(tmp_path.iterdir()) == []


def test_report_of_a_study_without_completed_trials_is_one_line_exit_2(fam, tmp_path, capsys):
    config = config_for(fam, tmp_path)
    study = optuna.create_study(study_name="r", storage=config.storage_url, direction="maximize")
    study.set_user_attr("config", config.model_dump(mode="json"))
    trial = study.ask()
    study.tell(trial, state=TrialState.FAIL)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "evomerge report: error: study 'r' has no completed trial yet (0 running, 1 failed)"


def test_test_split_columns_are_lm_eval_scores_of_each_rows_model(tmp_path):
    """The real path: lm-eval fixture tasks, the search split scored by the search, the test split by the report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators import LmEvalEvaluator
    from tests.test_evaluators import FIXTURE_TASKS, make_noisy_family

    fam = make_noisy_family(tmp_path, 0.5)
    run_dir = tmp_path / "run"
    config = config_for(fam, run_dir, n_trials=2, include_path=str(FIXTURE_TASKS), batch_size=8,
                        tasks=[{"name": "fx_pick"}, {"name": "fx_yesno"}])
    study = search(config, progress=False)
    write_report(run_dir)
    table = pd.read_csv(run_dir / "leaderboard.csv").set_index("model")

    on_test = LmEvalEvaluator(["fx_pick", "fx_yesno"], include_path=FIXTURE_TASKS, split="test", batch_size=8)
    source = on_test.score(AutoModelForCausalLM.from_pretrained(fam["ft1"]), AutoTokenizer.from_pretrained(fam["ft1"]))
    assert table.loc["ft1", "average (test)"] == pytest.approx(objective_of(source, config))
    assert main(["merge", str(run_dir / "best_recipe.yaml"), str(tmp_path / "best"), "--quiet"]) == 0
    best = on_test.score(AutoModelForCausalLM.from_pretrained(tmp_path / "best"),
                         AutoTokenizer.from_pretrained(fam["base"]))
    assert table.loc[f"trial {study.best_trial.number}", "average (test)"] == pytest.approx(objective_of(best, config))
    assert table.loc["ft1", "fx_pick acc (search)"] == study.user_attrs["baselines"]["ft1"]["scores"]["tasks"][
        "fx_pick"]["metrics"]["acc"]
