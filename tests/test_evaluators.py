"""Evaluators on a tiny random Llama and two fixture tasks (tests/fixtures/tasks): no network, well under a minute."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evaluators import LmEvalEvaluator, PerplexityEvaluator, Scores, TaskScore, weighted_average  # noqa: E402
from merge_core.errors import EvomergeError  # noqa: E402

FIXTURE_TASKS = Path(__file__).parent / "fixtures" / "tasks"


def _fixture_texts() -> list[str]:
    texts = []
    for data_file in sorted((FIXTURE_TASKS / "data").glob("*.jsonl")):
        for line in data_file.read_text().splitlines():
            item = json.loads(line)
            texts.append(f"Q: {item['question']}\nA: " + " ".join(item.get("choices") or [item["answer"]]))
    return texts


def make_tiny_model(out_dir: Path):
    """A word-level tokenizer trained on the fixture data and a random 2-layer Llama, saved to ``out_dir``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_fixture_texts(), trainers.WordLevelTrainer(
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model, tokenizer



def make_noisy_family(root: Path, noise: float) -> dict[str, str]:
    """``make_tiny_model``'s base and two fine-tunes, each the base plus seeded Gaussian noise of std ``noise``
    on every tensor: a family whose members score differently on the fixture tasks."""
    from transformers import AutoModelForCausalLM

    base, tokenizer = make_tiny_model(root / "base")
    paths = {"base": str(root / "base")}
    for i in (1, 2):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            tuned = {n: t + noise * torch.randn(t.shape, generator=generator) for n, t in base.state_dict().items()}
        model = AutoModelForCausalLM.from_pretrained(paths["base"])
        model.load_state_dict(tuned)
        model.save_pretrained(root / f"ft{i}")
        tokenizer.save_pretrained(root / f"ft{i}")
        paths[f"ft{i}"] = str(root / f"ft{i}")
    return paths

def force_token(model, token_id: int) -> None:
    """Make greedy decoding always emit ``token_id``: residual dim 0 is held at 1, the only thing lm_head reads."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0].zero_()
            layer.mlp.down_proj.weight[0].zero_()
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_id, 0] = 10.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = make_tiny_model(model_dir)
    return model_dir, model, tokenizer


@pytest.fixture(scope="module")
def evaluator():
    return LmEvalEvaluator(["fx_pick", "fx_yesno"], include_path=FIXTURE_TASKS, split="search")


@pytest.fixture()
def restore_weights(tiny):
    _, model, _ = tiny
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    yield
    model.load_state_dict(original)


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURE_TASKS / "data" / name).read_text().splitlines()]


# --- Scores --------------------------------------------------------------------------------------------

SCORES = Scores(tasks={
    "qa": TaskScore(metrics={"acc": 0.5, "brier_score": 0.4}, higher_is_better={"acc": True, "brier_score": False},
                    samples={"acc": [1.0, 0.0]}, n=2),
    "ppl": TaskScore(metrics={"perplexity": 4.0, "nll": math.log(4.0)},
                     higher_is_better={"perplexity": False, "nll": False}, samples={"nll": [1.0, 1.77]}, n=2),
}, seconds=1.5)


def test_scores_round_trip_through_json():
    assert Scores.from_dict(json.loads(json.dumps(SCORES.to_dict()))) == SCORES


def test_value_defaults_to_the_primary_metric_and_rejects_unknown_ones():
    assert SCORES.value("qa") == 0.5
    assert SCORES.value("qa", "brier_score") == 0.4
    with pytest.raises(EvomergeError, match="no metric 'f1'"):
        SCORES.value("qa", "f1")
    with pytest.raises(EvomergeError, match="no scores for task 'nope'"):
        SCORES.value("nope")


def test_weighted_average_reads_perplexity_as_its_reciprocal_and_refuses_other_lower_is_better_metrics():
    assert weighted_average(SCORES, {"qa": 3, "ppl": 1}) == pytest.approx((3 * 0.5 + 1 * 0.25) / 4)
    with pytest.raises(EvomergeError, match="lower-is-better"):
        weighted_average(SCORES, {"qa": 1}, metrics={"qa": "brier_score"})
    with pytest.raises(EvomergeError, match="lower-is-better"):
        weighted_average(SCORES, {"ppl": 1}, metrics={"ppl": "nll"})


# --- LmEvalEvaluator -----------------------------------------------------------------------------------

def test_scores_have_lm_eval_metrics_directions_and_per_document_values(tiny, evaluator):
    _, model, tokenizer = tiny
    scores = evaluator.score(model, tokenizer)
    pick, yesno = scores.tasks["fx_pick"], scores.tasks["fx_yesno"]
    assert list(pick.metrics) == ["acc", "acc_norm", "brier_score"]
    assert pick.higher_is_better == {"acc": True, "acc_norm": True, "brier_score": False}
    assert pick.n == len(_jsonl("fx_pick_search.jsonl")) == len(pick.samples["acc"])
    assert set(pick.samples["acc"]) <= {0.0, 1.0}
    assert pick.metrics["acc"] == pytest.approx(sum(pick.samples["acc"]) / pick.n)
    assert "brier_score" not in pick.samples  # its per-document value is not a number
    assert list(yesno.metrics) == ["exact_match"] and yesno.n == len(_jsonl("fx_yesno_search.jsonl"))
    assert scores.seconds > 0


def test_scores_equal_a_plain_lm_eval_run(tiny, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    _, model, tokenizer = tiny
    ours = LmEvalEvaluator(["fx_pick", "fx_yesno"], include_path=FIXTURE_TASKS, split="test").score(model, tokenizer)
    monkeypatch.chdir(FIXTURE_TASKS)  # plain lm-eval reads data_files relative to the working directory
    theirs = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=32),
                             tasks=["fx_pick", "fx_yesno"], bootstrap_iters=0,
                             task_manager=TaskManager(include_path=str(FIXTURE_TASKS), include_defaults=False))
    for task, filter_name in [("fx_pick", "none"), ("fx_yesno", "first_word")]:
        for metric, value in ours.tasks[task].metrics.items():
            assert value == pytest.approx(theirs["results"][task][f"{metric},{filter_name}"])
        for metric, values in ours.tasks[task].samples.items():
            logged = sorted(theirs["samples"][task], key=lambda sample: sample["doc_id"])
            assert values == [float(sample[metric]) for sample in logged]


def test_weights_changed_in_place_are_scored_and_restoring_them_restores_the_score(tiny, evaluator):
    _, model, tokenizer = tiny
    before = evaluator.score(model, tokenizer).tasks["fx_pick"]
    original = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        model.lm_head.weight.mul_(-3.0)
    changed = evaluator.score(model, tokenizer).tasks["fx_pick"]
    with torch.no_grad():
        model.lm_head.weight.copy_(original)
    after = evaluator.score(model, tokenizer).tasks["fx_pick"]
    assert changed.metrics["brier_score"] != pytest.approx(before.metrics["brier_score"])
    assert changed.samples != before.samples
    assert after == before


def test_generation_follows_in_place_weights(tiny, evaluator, restore_weights):
    _, model, tokenizer = tiny
    assert evaluator.score(model, tokenizer).value("fx_yesno") < 0.5
    force_token(model, tokenizer.convert_tokens_to_ids("yes"))
    scores = evaluator.score(model, tokenizer).tasks["fx_yesno"]
    expected = [1.0 if item["answer"] == "yes" else 0.0 for item in _jsonl("fx_yesno_search.jsonl")]
    assert scores.samples["exact_match"] == expected
    assert scores.metrics["exact_match"] == pytest.approx(sum(expected) / len(expected))


def test_tasks_and_requests_are_built_once(tiny, evaluator, monkeypatch):
    _, model, tokenizer = tiny
    evaluator.score(model, tokenizer)
    for task in evaluator.tasks.values():
        monkeypatch.setattr(task, "build_all_requests", lambda **_: pytest.fail("requests rebuilt"))
    evaluator.score(model, tokenizer)


def test_split_limit_and_metric_selection_are_honoured(tiny):
    _, model, tokenizer = tiny
    test_split = LmEvalEvaluator("fx_pick", include_path=FIXTURE_TASKS, split="test", metrics={"fx_pick": ["acc"]})
    scores = test_split.score(model, tokenizer).tasks["fx_pick"]
    assert scores.n == len(_jsonl("fx_pick_test.jsonl")) and list(scores.metrics) == ["acc"]
    limited = LmEvalEvaluator(["fx_pick"], include_path=FIXTURE_TASKS, limit=5)
    assert limited.score(model, tokenizer).tasks["fx_pick"].n == 5
    with pytest.raises(EvomergeError, match=r"no 'validation' split .*\(it has: search, test\)"):
        LmEvalEvaluator(["fx_pick"], include_path=FIXTURE_TASKS, split="validation")


def test_data_files_resolve_relative_to_the_yaml_from_any_working_directory(tiny, tmp_path, monkeypatch):
    _, model, tokenizer = tiny
    shutil.copytree(FIXTURE_TASKS, tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path)
    scores = LmEvalEvaluator(["fx_all"], include_path="elsewhere", limit=3).score(model, tokenizer)  # a tag
    assert {name: task.n for name, task in scores.tasks.items()} == {"fx_pick": 3, "fx_yesno": 3}


def test_a_missing_data_file_is_reported(tmp_path):
    shutil.copytree(FIXTURE_TASKS, tmp_path / "tasks")
    (tmp_path / "tasks" / "data" / "fx_pick_search.jsonl").unlink()
    with pytest.raises(EvomergeError, match="data file 'data/fx_pick_search.jsonl' not found"):
        LmEvalEvaluator(["fx_pick"], include_path=tmp_path / "tasks")


def test_unknown_task_names_get_close_matches():
    with pytest.raises(EvomergeError, match=r"unknown task 'fx_pik' \(did you mean: fx_pick"):
        LmEvalEvaluator(["fx_pik"], include_path=FIXTURE_TASKS)


def test_standard_lm_eval_tasks_are_found_and_missing_offline_data_is_reported():
    with pytest.raises(EvomergeError, match="arc_easy.*not available offline"):
        LmEvalEvaluator(["arc_easy"], include_path=FIXTURE_TASKS, split=None)


def test_metrics_a_task_does_not_produce_and_sampling_are_refused():
    with pytest.raises(EvomergeError, match="does not produce metric f1"):
        LmEvalEvaluator(["fx_pick"], include_path=FIXTURE_TASKS, metrics={"fx_pick": ["f1"]})
    with pytest.raises(EvomergeError, match="greedy"):
        LmEvalEvaluator(["fx_yesno"], include_path=FIXTURE_TASKS, gen_kwargs={"do_sample": True})


# --- PerplexityEvaluator -------------------------------------------------------------------------------

def test_perplexity_is_lower_is_better_with_per_chunk_samples_and_follows_weights(tiny, tmp_path, restore_weights):
    _, model, tokenizer = tiny
    text = tmp_path / "heldout.txt"
    text.write_text("\n".join(_fixture_texts()))
    evaluator = PerplexityEvaluator(text, max_tokens=100, context_length=32)
    scores = evaluator.score(model, tokenizer).tasks[evaluator.task_name]
    assert scores.higher_is_better == {"perplexity": False, "nll": False}
    assert scores.n == len(scores.samples["nll"]) == 4  # 32 + 32 + 32 + 4 tokens
    assert scores.metrics["perplexity"] == pytest.approx(math.exp(scores.metrics["nll"]))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform next-token distribution: perplexity = vocabulary size
    uniform = evaluator.score(model, tokenizer).value(evaluator.task_name)
    assert uniform == pytest.approx(model.config.vocab_size, rel=1e-4)


# --- the demo zoo (built once per machine and shared with the other tests) ------------------------------

@pytest.mark.slow
def test_each_zoo_fine_tune_masters_its_own_task_through_lm_eval():
    from search import demo

    zoo = demo.ensure_zoo()
    from evaluators import load_model

    tasks = zoo.manifest["tasks"]
    evaluator = LmEvalEvaluator([tasks[skill] for skill in zoo.finetunes], split="test", threads=1)
    for skill, path in zoo.finetunes.items():
        model, tokenizer = load_model(path)
        scores = evaluator.score(model, tokenizer)
        assert scores.value(tasks[skill]) >= 0.6, (skill, scores.value(tasks[skill]))


# --- CLI -----------------------------------------------------------------------------------------------

def test_eval_command_writes_scores_json(tiny, tmp_path, capsys):
    from search.cli import main

    model_dir, _, _ = tiny
    out = tmp_path / "scores.json"
    code = main(["eval", str(model_dir), "--tasks", "fx_pick,fx_yesno", "--include-path", str(FIXTURE_TASKS),
                 "--limit", "4", "--output", str(out)])
    assert code == 0
    scores = Scores.from_dict(json.loads(out.read_text()))
    assert set(scores.tasks) == {"fx_pick", "fx_yesno"} and scores.tasks["fx_pick"].n == 4
    assert "fx_pick" in capsys.readouterr().out


def test_eval_command_reports_bad_input_in_one_line(tiny, tmp_path, capsys):
    from search.cli import main

    model_dir, _, _ = tiny
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    shutil.copy(model_dir / "config.json", no_tokenizer)
    assert main(["eval", str(no_tokenizer), "--tasks", "fx_pick", "--include-path", str(FIXTURE_TASKS)]) == 2
    assert main(["eval", str(model_dir), "--tasks", "fx_pik", "--include-path", str(FIXTURE_TASKS)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "no tokenizer" in errors[0] and "fx_pick" in errors[1]


def test_rungs_score_nested_document_subsets_once_each_and_the_last_rung_equals_a_full_score(tiny, evaluator,
                                                                                            monkeypatch):
    from evaluators.lm_eval_evaluator import LmEvalEvaluator as Evaluator
    from evaluators.lm_eval_evaluator import rung_order

    _, model, tokenizer = tiny
    full = evaluator.score(model, tokenizer)
    run = Evaluator._run
    instances_run = []

    def counting(lm, requests, clear=True):
        instances_run.extend(i for group in requests.by_type.values() for i in group)
        return run(lm, requests, clear)

    monkeypatch.setattr(Evaluator, "_run", staticmethod(counting))
    rungs = list(evaluator.score_rungs(model, tokenizer, [3, 7, None]))
    assert len(rungs) == 3
    for size, scores in zip([3, 7, 12], rungs):
        for name in ("fx_pick", "fx_yesno"):
            positions = sorted(rung_order(name, 12)[:size])
            task = scores.tasks[name]
            assert task.n == size
            metric = "acc" if name == "fx_pick" else "exact_match"
            assert task.samples[metric] == [full.tasks[name].samples[metric][i] for i in positions]
            assert task.metrics[metric] == pytest.approx(sum(task.samples[metric]) / size)
    assert rungs[-1].tasks == full.tasks  # brier_score (a corpus aggregation) included
    assert len(instances_run) == len({id(i) for i in instances_run})  # no document scored twice
    in_rungs = len(instances_run)
    evaluator.score(model, tokenizer)
    assert len(instances_run) - in_rungs == in_rungs  # and all of them, as a full score does
    assert evaluator.document_counts() == {"fx_pick": 12, "fx_yesno": 12}


# --- lm-eval's options, passed through ----------------------------------------------------------------

def test_per_task_limits_system_instruction_and_model_args_reach_lm_eval(tiny):
    _, model, tokenizer = tiny
    evaluator = LmEvalEvaluator(["fx_pick", "fx_yesno"], include_path=FIXTURE_TASKS, limit=6, limits={"fx_pick": 3},
                                system_instruction="Answer briefly.", model_args={"max_length": 48})
    assert evaluator.document_counts() == {"fx_pick": 3, "fx_yesno": 6}
    scores = evaluator.score(model, tokenizer)
    assert scores.tasks["fx_pick"].n == 3 and scores.tasks["fx_yesno"].n == 6
    contexts = [inst.args[0] for task in evaluator.tasks.values() for inst in task.instances]
    assert contexts and all(c.startswith("Answer briefly.") for c in contexts)
    assert evaluator._lm.max_length == 48


def test_lm_eval_options_a_live_model_cannot_take_are_one_line_naming_them():
    with pytest.raises(EvomergeError, match=r"model_args\.dtype: a loading option"):
        LmEvalEvaluator(["fx_pick"], include_path=FIXTURE_TASKS, model_args={"dtype": "bfloat16"})
    with pytest.raises(EvomergeError, match=r"model_args\.max_lenght: lm-eval's HF model has no such argument"):
        LmEvalEvaluator(["fx_pick"], include_path=FIXTURE_TASKS, model_args={"max_lenght": 8})
    with pytest.raises(EvomergeError, match=r"model_args\.batch_size: set by evomerge"):
        LmEvalEvaluator(["fx_pick"], include_path=FIXTURE_TASKS, model_args={"batch_size": 8})
    with pytest.raises(EvomergeError, match="fewshot_as_multiturn needs apply_chat_template"):
        LmEvalEvaluator(["fx_pick"], include_path=FIXTURE_TASKS, fewshot_as_multiturn=True)
    with pytest.raises(EvomergeError, match="limits given for tasks not evaluated: fx_nope"):
        LmEvalEvaluator(["fx_pick"], include_path=FIXTURE_TASKS, limits={"fx_nope": 2})


def test_eval_command_takes_model_args_and_gen_kwargs_as_lm_eval_spells_them(tiny, tmp_path, capsys, monkeypatch):
    import torch

    import evaluators.loading as loading
    from search.cli import main

    model_dir, _, _ = tiny
    real, loaded = loading.load_model, {}

    def spy(path, **kwargs):
        model, tokenizer = real(path, **kwargs)
        loaded["dtype"] = model.dtype
        return model, tokenizer

    monkeypatch.setattr(loading, "load_model", spy)
    fixtures = ["--tasks", "fx_yesno", "--include-path", str(FIXTURE_TASKS)]
    assert main(["eval", str(model_dir), *fixtures, "--limit", "3", "--model-args", "dtype=bfloat16,max_length=64",
                 "--gen-kwargs", "max_gen_toks=4", "--system-instruction", "Be brief."]) == 0
    assert loaded["dtype"] == torch.bfloat16
    assert main(["eval", str(model_dir), *fixtures, "--gen-kwargs", "do_sample=true"]) == 2
    assert main(["eval", str(model_dir), *fixtures, "--model-args", "max_length"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert "greedy" in errors[-2] and "--model-args: 'max_length': expected key=value pairs" in errors[-1]
