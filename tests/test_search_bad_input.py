"""`evomerge search` and `validate` with hostile input: one line naming the field, exit 2, nothing written.

Every bad config or flag below is refused by `validate` and, identically, by `search` before it creates or
touches a study; a search whose candidates keep failing stops with the reason instead of looping.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from transformers import LlamaConfig, LlamaForCausalLM

from evaluators import Scores, TaskScore
from merge_core.errors import EvomergeError
from search.cli import main
from search.config import SearchConfig
from search.loop import REPEATED_FAILURES, counts, search
from tests.families import make_family, tokenizer

TASKS = str(Path(__file__).resolve().parent.parent / "configs" / "tasks")


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    paths = {k: str(v) for k, v in make_family(root, "llama", n_finetunes=3, layers=2).items()}
    paths["deep"] = str(make_family(root / "deep", "llama", n_finetunes=1, layers=3)["ft1"])
    wide = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                        tie_word_embeddings=False))
    wide.save_pretrained(root / "wide")
    tokenizer().save_pretrained(root / "wide")
    paths["wide"] = str(root / "wide")
    lying = root / "lying"
    shutil.copytree(paths["ft2"], lying)
    config = json.loads((lying / "config.json").read_text())
    (lying / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    paths["lying"] = str(lying)
    truncated = root / "truncated"
    shutil.copytree(paths["ft2"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    paths["truncated"] = str(truncated)
    untokenized = root / "untokenized"
    shutil.copytree(paths["base"], untokenized)
    for tokenizer_file in untokenized.glob("tokenizer*"):
        tokenizer_file.unlink()
    paths["untokenized"] = str(untokenized)
    paths["file"] = str(root / "a_file")
    Path(paths["file"]).write_text("not a directory")
    return paths


def good_config(fam, run: Path, **extra) -> dict:
    return {"name": "t", "base_model": fam["base"], "models": [fam["ft1"], fam["ft2"]],
            "method": "task_arithmetic", "parameters": {"weight": {"low": 0.0, "high": 1.0}},
            "tasks": [{"name": "zoo_cap"}], "include_path": TASKS, "n_trials": 3, "output_dir": str(run), **extra}


def _damaged_study(run: Path, how: str) -> None:
    run.mkdir(parents=True)
    db = run / "study.db"
    if how == "garbage":
        db.write_bytes(b"this is not a database" * 100)
        return
    study = optuna.create_study(storage=f"sqlite:///{db}", study_name="t")
    study.set_user_attr("config", {"padding": "x" * 20000})
    study._storage._backend.engine.dispose()  # checkpointed: the whole study is in study.db
    db.write_bytes(db.read_bytes()[: 3 * 4096])  # a crash or a full disk mid-copy


# case: (config changes, flags, expected in the one line, setup of the run directory)
CASES = {
    "slerp over base and 2 fine-tunes": (
        {"method": "slerp", "parameters": {"t": {"low": 0, "high": 1}}}, [],
        "models: slerp needs exactly 2 models (base included), got 3", None),
    "nuslerp with 3 models": (
        {"method": "nuslerp", "models": ["ft1", "ft2", "ft3"]}, [], "nuslerp needs exactly 2 models besides the base",
        None),
    "passthrough of 2 models": (
        {"method": "passthrough", "parameters": {"scale": {"low": 0.5, "high": 1}}}, [],
        "models: passthrough needs", None),
    "source with another layer count": ({"models": ["ft1", "deep"]}, [], "has 3 layers, the base_model 2", None),
    "source with another hidden size": ({"models": ["ft1", "wide"]}, [], "differ in size", None),
    "source whose config disagrees with its tensors": (
        {"models": ["ft1", "lying"]}, [], "config.json says hidden_size=64", None),
    "truncated weights": ({"models": ["ft1", "truncated"]}, [], "truncated", None),
    "base without a tokenizer": ({"base_model": "untokenized"}, [], "base_model: ", None),
    "missing model": ({"models": ["ft1", "nowhere"]}, [], "nowhere", None),
    "same model through another path spelling": ({"models": ["ft1", "ft1/../ft1"]}, [], "are the same model", None),
    "base among the models of a base-relative method": ({"models": ["ft1", "base"]}, [], "is the base_model", None),
    "model listed twice": ({"models": ["ft1", "ft1"]}, [], "listed twice", None),
    "density range beyond (0, 1]": (
        {"method": "ties", "parameters": {"weight": {"low": 0, "high": 1}, "density": {"low": 0.2, "high": 1.5}}},
        [], "parameters.density: high 1.5: ", None),
    "density range reaching 0": (
        {"method": "ties", "parameters": {"weight": {"low": 0, "high": 1}, "density": {"low": 0.0, "high": 1.0}}}, [],
        "parameters.density: low 0.0: ", None),
    "unknown method": ({"method": "averaging"}, [], "method: unknown method 'averaging'", None),
    "parameter the method lacks": ({"parameters": {"t": {"low": 0, "high": 1}}}, [], "parameters.t", None),
    "parameter both fixed and searched": ({"fixed": {"weight": 0.5}}, [], "fixed.weight", None),
    "required parameter neither searched nor fixed": (
        {"method": "ties", "parameters": {"density": {"low": 0.2, "high": 1.0}}}, [],
        "parameters.weight: ties needs weight", None),
    "nothing to search": ({"parameters": {}}, [], "parameters: nothing to search", None),
    "empty range": ({"parameters": {"weight": {"low": 1, "high": 1}}}, [], "must be below high", None),
    "infinite bound": ({"parameters": {"weight": {"low": float("-inf"), "high": 1}}}, [],
                       "parameters.weight.low", None),
    "reserved group name": (
        {"parameters": {"weight": {"low": 0, "high": 1, "granularity": "groups", "groups": ["mlp", "rest"]}}}, [],
        "parameters.weight.groups", None),
    "group matching no tensor": (
        {"parameters": {"weight": {"low": 0, "high": 1, "granularity": "groups", "groups": ["mlp", "atention"]}}}, [],
        "parameters.weight.groups: 'atention' matches no tensor name", None),
    "unknown key": ({"n_trails": 5}, [], "n_trails", None),
    "zero trials": ({"n_trials": 0}, [], "n_trials", None),
    "no budget": ({"n_trials": None}, [], "give a budget: n_trials, timeout, max_items, or several", None),
    "negative seed": ({"seed": -1}, [], "seed", None),
    "rungs not increasing": ({"fidelity": {"rungs": [20, 10, "all"]}}, [],
                             "fidelity.rungs: [20, 10, 'all']: rungs must be positive and strictly increasing", None),
    "rung 'all' before the last": ({"fidelity": {"rungs": ["all", 30]}}, [], "only the last may be 'all'", None),
    "one rung": ({"fidelity": {"rungs": ["all"]}}, [], "fidelity.rungs", None),
    "rung beyond the split": ({"fidelity": {"rungs": [20, 500, "all"]}}, [],
                              "fidelity.rungs[1]: 500 documents per task, but the largest task", None),
    "unknown pruner": ({"fidelity": {"rungs": [20, "all"], "pruner": "median"}}, [], "fidelity.pruner", None),
    "pruner with a sampler that cannot use it": ({"sampler": "gp", "fidelity": {"rungs": [20, "all"]}}, [],
                                                 "fidelity: the gp sampler learns from complete trials only", None),
    "reduction factor 1": ({"fidelity": {"rungs": [20, "all"], "reduction_factor": 1}}, [],
                           "fidelity.reduction_factor", None),
    "unknown warm start": ({"warm_start": ["best"]}, [], "warm_start.0", None),
    "unknown sampler": ({"sampler": "nsga"}, [], "sampler: Input should be", None),
    "name that is a path": ({"name": "../elsewhere"}, [], "name", None),
    "task listed twice": ({"tasks": [{"name": "zoo_cap"}, {"name": "zoo_cap"}]}, [], "listed twice", None),
    "unknown task": ({"tasks": [{"name": "zoo_nope"}]}, [], "zoo_nope", None),
    "metric the task does not produce": (
        {"tasks": [{"name": "zoo_cap", "metric": "acc"}]}, [],
        "tasks[0].metric: task 'zoo_cap' does not produce metric 'acc'",
        None),
    "task weight zero": ({"tasks": [{"name": "zoo_cap", "weight": 0}]}, [], "tasks.0.weight", None),
    "include_path not a directory": ({"include_path": "file"}, [], "not a directory", None),
    "device tpu": ({"device": "tpu"}, [], "device: use cpu, cuda or cuda:N", None),
    "output_dir is a file": ({"output_dir": "file"}, [], "output_dir: ", None),
    "output_dir under a file": ({"output_dir": "file/run"}, [], "output_dir: ", None),
    "malformed storage URL": ({"storage": "not a url"}, [], "storage: 'not a url' is not a database URL", None),
    "unknown storage dialect": ({"storage": "nosuchdb://host/x"}, [], "storage: ", None),
    "in-memory storage": ({"storage": "sqlite://"}, [], "in-memory", None),
    "unreachable PostgreSQL": (
        {"storage": "postgresql+psycopg2://evomerge@127.0.0.1:1/nothing"}, [], "cannot connect", None),
    "database driver not installed": ({"storage": "mysql+nosuchdriver://u@localhost/x"}, [], "storage: ", None),
    "SQLite storage under a file": ({"storage": lambda fam: f"sqlite:///{fam['file']}/study.db"}, [], "storage: ",
                                    None),
    "corrupt study.db": ({}, [], "storage: ", "garbage"),
    "truncated study.db": ({}, [], "storage: ", "truncated"),
    "--n-trials 0": ({}, ["--n-trials", "0"], "--n-trials: Input should be greater than or equal to 1", None),
    "--n-trials -3": ({}, ["--n-trials", "-3"], "--n-trials: ", None),
    "--timeout -1": ({}, ["--timeout", "-1"], "--timeout: Input should be greater than 0", None),
    "--timeout nan": ({}, ["--timeout", "nan"], "--timeout: ", None),
    "--max-items 0": ({}, ["--max-items", "0"], "--max-items: Input should be greater than or equal to 1", None),
    "--device tpu": ({}, ["--device", "tpu"], "--device: use cpu, cuda or cuda:N, not 'tpu'", None),
    "--storage empty": ({}, ["--storage", ""], "--storage: ", None),
    "--study-name empty": ({}, ["--study-name", ""], "--study-name: ", None),
    "constraint on an unknown task": ({"constraints": [{"task": "zoo_nope", "no_worse_than": "base"}]}, [],
                                      "constraints[0].task: 'zoo_nope' is not a task of tasks or perplexity", None),
    "constraint on a metric the task lacks": (
        {"constraints": [{"task": "zoo_cap", "metric": "acc", "no_worse_than": "base"}]}, [],
        "constraints[0].metric: task 'zoo_cap' has no metric 'acc'", None),
    "constraint against an unknown model": ({"constraints": [{"task": "every", "no_worse_than": "ft9"}]}, [],
                                            "constraints[0].no_worse_than: 'ft9' is not base, best_source", None),
    "constraint with a ratio below 1": (
        {"constraints": [{"task": "zoo_cap", "no_worse_than": "base", "ratio": 0.5}]}, [],
        "constraints.0.ratio", None),
    "objective on an unknown task": ({"objectives": ["zoo_cap", "zoo_nope"]}, [],
                                     "objectives[1]: 'zoo_nope' is not a task of tasks or perplexity", None),
    "cmaes with two objectives": (
        {"sampler": "cmaes", "tasks": [{"name": "zoo_cap"}, {"name": "zoo_rev"}], "objectives": ["zoo_cap", "zoo_rev"]},
        [], "sampler: cmaes cannot serve 2 objectives", None),
    "pruning two objectives": (
        {"tasks": [{"name": "zoo_cap"}, {"name": "zoo_rev"}], "objectives": ["zoo_cap", "zoo_rev"],
         "fidelity": {"rungs": [10, "all"]}}, [], "fidelity: Optuna's pruners compare one objective", None),
    "slerp in a method list with three models": (
        {"method": ["task_arithmetic", "slerp"],
         "parameters": {"weight": {"low": 0, "high": 1}, "t": {"low": 0, "high": 1}}}, [],
        "method[1]: slerp: slerp needs exactly 2 models (base included), got 3", None),
    "unknown method in a list": ({"method": ["task_arithmetic", "averaging"]}, [],
                                 "method[1]: unknown method 'averaging'", None),
    "method in a list with no searched parameter": (
        {"method": ["task_arithmetic", "karcher"]}, [], "method: karcher has none of the searched parameters", None),
    "sampling in gen_kwargs": ({"gen_kwargs": {"do_sample": True}}, [], "gen_kwargs.do_sample: True: every model is "
                                                                       "scored greedily", None),
    "fewshot_as_multiturn without a chat template": ({"fewshot_as_multiturn": True}, [],
                                                      "fewshot_as_multiturn needs apply_chat_template", None),
    "a revision in model_args": ({"model_args": {"revision": "main"}}, [], "model_args.revision: name the revision",
                                 None),
    "a model_args key lm-eval lacks": ({"model_args": {"max_lenght": 64}}, [],
                                       "model_args.max_lenght: lm-eval's HF model has no such argument", None),
    "a per-task limit of 2.5 documents": ({"tasks": [{"name": "zoo_cap", "limit": 2.5}]}, [], "tasks.0.limit", None),
    "perplexity text that is not there": ({"perplexity": [{"name": "held", "text": "file/nowhere.txt"}]}, [],
                                          "perplexity[0].text: ", None),
}
if not torch.cuda.is_available():
    CASES["--device cuda without CUDA"] = ({}, ["--device", "cuda"], "device: cuda: CUDA is not available", None)
    CASES["device: cuda without CUDA"] = ({"device": "cuda:0"}, [], "device: cuda:0: CUDA is not available", None)


def _resolve(fam, value):
    """Names of the fixture's models (and ``file``) in a config change become their paths."""
    if callable(value):
        return value(fam)
    if isinstance(value, list):
        return [_resolve(fam, v) for v in value]
    if isinstance(value, str):
        head, sep, tail = value.partition("/")
        if head in fam:
            return fam[head] + sep + tail
    return value


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Files with their sizes and times, and directories (whose times change with a temporary file)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in root.rglob("*")}


@pytest.mark.parametrize("command", ["validate", "search"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_or_flag_is_one_line_exit_2_and_leaves_everything_as_it_was(fam, tmp_path, capsys, case,
                                                                               command):
    changes, flags, expected, damage = CASES[case]
    run = tmp_path / "run"
    config = good_config(fam, run)
    for key, value in changes.items():
        config[key] = _resolve(fam, value)
    if damage:
        _damaged_study(run, damage)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert main([command, str(path), *flags]) == 2, case
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"evomerge {command}: error: ") and expected in lines[0], lines[0]
    assert _snapshot(tmp_path) == before, "the failed command created or changed files"


def test_a_good_config_validates_and_writes_nothing(fam, tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(good_config(fam, tmp_path / "run")))
    assert main(["validate", str(path), "--n-trials", "7"]) == 0
    assert "valid" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


class Evaluator:
    """A cheap evaluator whose scores or failures a test chooses: ``fail(call)`` gives the error to raise."""

    def __init__(self, fail=lambda call: None):
        self.calls = 0
        self.fail = fail

    def score(self, model, tokenizer) -> Scores:
        self.calls += 1
        error = self.fail(self.calls)
        if error is not None:
            raise error
        value = float(model.state_dict()["model.norm.weight"].sum())
        return Scores({"zoo_cap": TaskScore({"score": value}, {"score": True}, {"score": [value]}, 1)}, 0.0)


def config_for(fam, tmp_path, **extra) -> SearchConfig:
    return SearchConfig.model_validate(good_config(fam, tmp_path / "run", **extra))


BASELINES = 3  # the base and two fine-tunes are scored once before the first trial


def test_candidates_failing_for_one_reason_stop_the_search_with_that_reason(fam, tmp_path):
    evaluator = Evaluator(lambda call: RuntimeError("out of luck") if call > BASELINES else None)
    with pytest.raises(EvomergeError, match=f"the last {REPEATED_FAILURES} candidates all failed with "
                                            "RuntimeError: out of luck"):
        search(config_for(fam, tmp_path, n_trials=1000), evaluator=evaluator, progress=False)
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path}/run/study.db")
    assert [t.state for t in study.trials] == [TrialState.FAIL] * REPEATED_FAILURES


def test_a_timeout_only_search_of_failing_candidates_stops_too(fam, tmp_path):
    evaluator = Evaluator(lambda call: ValueError("never") if call > BASELINES else None)
    with pytest.raises(EvomergeError, match="candidates all failed with ValueError: never"):
        search(config_for(fam, tmp_path, n_trials=None, timeout=3600), evaluator=evaluator, progress=False)
    assert evaluator.calls == BASELINES + REPEATED_FAILURES


def test_failed_candidates_count_against_n_trials_so_the_budget_is_finite(fam, tmp_path, capsys):
    """Each candidate fails for another reason (no repeated-failure stop): the budget ends the search."""
    evaluator = Evaluator(lambda call: RuntimeError(f"failure {call}") if call > BASELINES else None)
    study = search(config_for(fam, tmp_path, n_trials=7), evaluator=evaluator, progress=False)
    assert len(study.trials) == 7 and all(t.state == TrialState.FAIL and counts(t) for t in study.trials)


def test_a_search_with_no_complete_trial_is_an_error_naming_the_last_failure(fam, tmp_path, capsys, monkeypatch):
    import search.loop

    real = search.loop.search
    evaluator = Evaluator(lambda call: RuntimeError(f"failure {call}") if call > BASELINES else None)
    monkeypatch.setattr(search.loop, "search", lambda config, **kw: real(config, **{**kw, "evaluator": evaluator}))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(good_config(fam, tmp_path / "run", n_trials=2)))
    assert main(["search", str(path), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # after transformers' progress bar of the live model
    assert lines[-1] == ("evomerge search: error: no trial completed (2 failed; last failure: RuntimeError: "
                         "failure 5): no best recipe to report")
    assert not any("Traceback" in line or "error" in line for line in lines[:-1]), lines


def test_trials_of_dead_or_interrupted_workers_do_not_count_against_the_budget():
    def trial(state, **attrs):
        return optuna.trial.create_trial(state=state, user_attrs=attrs, **(
            {"value": 1.0} if state == TrialState.COMPLETE else {}))

    assert counts(trial(TrialState.COMPLETE)) and counts(trial(TrialState.RUNNING))
    assert counts(trial(TrialState.FAIL, fail_reason="RuntimeError: x", candidate_failed=True))
    assert not counts(trial(TrialState.FAIL, fail_reason="worker host:1 died"))
    assert not counts(trial(TrialState.FAIL, fail_reason="interrupted"))
    assert not counts(trial(TrialState.FAIL))  # failed by Optuna's stale-heartbeat check
    assert not counts(trial(TrialState.WAITING)) and not counts(trial(TrialState.PRUNED, surplus=True))
    assert counts(trial(TrialState.PRUNED, rung=0))  # stopped by the pruner: it cost what its rungs cost
    assert not counts(trial(TrialState.COMPLETE, source="ft1"))  # a warm start told from the baselines


@pytest.mark.parametrize("storage", [None, "sqlite:///{tmp}/new/dir/s.db"])
def test_a_start_failing_in_the_baselines_leaves_no_study_and_the_fixed_rerun_stores_its_own_config(
        fam, tmp_path, storage):
    storage = storage and storage.format(tmp=tmp_path)
    failing = Evaluator(lambda call: EvomergeError("task 'zoo_cap' has no metric 'score'"))
    with pytest.raises(EvomergeError, match="no metric"):
        search(config_for(fam, tmp_path, n_trials=2, storage=storage), evaluator=failing, progress=False)
    assert not list(tmp_path.iterdir())
    fixed = config_for(fam, tmp_path, n_trials=2, seed=7, storage=storage)
    study = search(fixed, evaluator=Evaluator(), progress=False)
    assert study.user_attrs["config"]["seed"] == 7
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2


def test_a_failed_restart_keeps_the_study_it_did_not_create(fam, tmp_path):
    config = config_for(fam, tmp_path, n_trials=2)
    search(config, evaluator=Evaluator(), progress=False)
    db = tmp_path / "run" / "study.db"
    labels = {"base", "ft1"}

    def forget_baselines(study):
        study.set_user_attr("baselines", {k: v for k, v in study.user_attrs["baselines"].items() if k in labels})

    forget_baselines(optuna.load_study(study_name="t", storage=f"sqlite:///{db}"))
    with pytest.raises(EvomergeError, match="broken"):
        search(config.model_copy(update={"n_trials": 4}), progress=False,
               evaluator=Evaluator(lambda call: EvomergeError("broken")))
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{db}")
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2


def test_a_full_sqlite_disk_stops_the_search_with_one_line(fam, tmp_path, monkeypatch):
    """SQLite's page limit stands in for a full disk: the same SQLITE_FULL error on the next write."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    config = config_for(fam, tmp_path, n_trials=50)
    trials = []

    def fill_disk(dbapi_connection, _record):
        if trials and isinstance(dbapi_connection, sqlite3.Connection):
            pages = dbapi_connection.execute("PRAGMA page_count").fetchone()[0]
            dbapi_connection.execute(f"PRAGMA max_page_count={pages}")

    event.listen(Engine, "connect", fill_disk)
    try:
        def on_trial(study, frozen):
            trials.append(frozen.number)
            backend = getattr(study._storage, "_backend", study._storage)
            backend.engine.dispose()  # the next statement opens a connection, which sees the full disk

        with pytest.raises(EvomergeError, match=r"^storage sqlite:///.*: database or disk is full$"):
            search(config, evaluator=Evaluator(), progress=False, on_trial=on_trial)
    finally:
        event.remove(Engine, "connect", fill_disk)
    assert trials and len(trials) < 50


def test_a_family_too_large_for_memory_is_one_line_before_anything_is_loaded(fam, tmp_path, capsys, monkeypatch):
    """Sources in another dtype than the search's are converted (copied); when the copies and the live model
    cannot fit in the available memory, validate and search say so naming the sizes, and write nothing."""
    from merge_core import memory

    monkeypatch.setattr(memory, "available_memory", lambda: 3 * memory.GIB)
    monkeypatch.setattr(memory, "WORKING_BYTES", 3 * memory.GIB - 1000)  # the tiny family's few KB then overflow
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(good_config(fam, tmp_path / "run", dtype="bfloat16")))
    for command in ("validate", "search"):
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "dtype: the live model (0.0 GiB), the sources converted to bfloat16" in err, err
        assert ("but 3.0 GiB is available; the sources are stored in float32: with dtype float32 they would be "
                "memory-mapped, not copied") in err, err
    assert not (tmp_path / "run").exists()


def test_sources_in_the_search_dtype_are_mapped_and_the_task_vector_cache_fits_what_is_left(fam, monkeypatch):
    from merge_core import memory
    from merge_core.adapters import SourceOpener

    readers = {ref: SourceOpener().open(fam[ref], fam["base"]) for ref in ("base", "ft1", "ft2")}
    plan = memory.plan_memory(readers, "base", torch.float32)
    size = plan.live_bytes
    assert plan.copied_bytes == 0 and plan.mapped_bytes == 3 * size  # the family is stored in float32
    converted = memory.plan_memory(readers, "base", torch.bfloat16)
    assert converted.copied_bytes == 3 * size // 2 and converted.live_bytes == size // 2
    roomy = memory.MemoryPlan(size, 0, 3 * size, memory.WORKING_BYTES + size + 10 * memory.GIB)
    assert roomy.cache_budget(4 * memory.GIB) == 4 * memory.GIB
    tight = memory.MemoryPlan(size, 0, 3 * size, memory.WORKING_BYTES + size + memory.GIB)
    assert tight.cache_budget(4 * memory.GIB) == memory.GIB // 2


def test_lm_eval_options_of_a_search_config_reach_the_evaluator(fam, tmp_path):
    from search.preflight import build_evaluator

    config = SearchConfig.model_validate(good_config(
        fam, tmp_path, tasks=[{"name": "zoo_cap", "limit": 4}, {"name": "zoo_rev"}], limit=7,
        system_instruction="Answer.", gen_kwargs={"max_gen_toks": 3},
        model_args={"dtype": "float32", "max_length": 32}))
    evaluator = build_evaluator(config)
    assert evaluator.document_counts() == {"zoo_cap": 4, "zoo_rev": 7}
    assert evaluator.system_instruction == "Answer." and evaluator.model_args == {"max_length": 32}
    assert evaluator.tasks["zoo_rev"].get_config("generation_kwargs")["max_gen_toks"] == 3
