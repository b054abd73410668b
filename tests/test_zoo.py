"""The demo family: task files, the skills' score pattern, the merge it exists for, caching and bad input."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import yaml

from merge_core.errors import EvomergeError
from search import demo
from search.cli import main

pytestmark = pytest.mark.slow  # trains the demo family, runs searches or worker processes

SPLITS = ("search", "test")


@pytest.fixture(scope="session")
def family() -> demo.Zoo:
    """Built once per machine (cached under results/zoo or $EVOMERGE_ZOO_DIR) and shared with other tests."""
    return demo.ensure_zoo()


@pytest.fixture(scope="session")
def loaded(family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family.base)
    models = {name: AutoModelForCausalLM.from_pretrained(path).eval() for name, path in family.models.items()}
    return tokenizer, models


def _data_files(yaml_path: Path) -> dict[str, Path]:
    config = yaml.safe_load(yaml_path.read_text())
    return {split: yaml_path.parent / f for split, f in config["dataset_kwargs"]["data_files"].items()}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- task files -----------------------------------------------------------------------------------------------

def test_every_task_has_disjoint_search_and_test_splits_of_modest_size():
    yamls = demo.task_yamls()
    assert set(yamls) == {"zoo_rev", "zoo_cap", "zoo_nxt", "zoo_rev_mc"}
    for name, yaml_path in yamls.items():
        files = _data_files(yaml_path)
        assert set(files) == set(SPLITS), name
        prompts = {split: [row["prompt"] for row in _rows(files[split])] for split in SPLITS}
        assert 50 <= len(prompts["search"]) <= 100 and len(prompts["test"]) == 100, name
        assert len(set(prompts["search"] + prompts["test"])) == len(prompts["search"]) + len(prompts["test"]), name


def test_generation_and_multiple_choice_tasks_are_configured_for_lm_eval():
    for skill in demo.SKILLS:
        config = yaml.safe_load(demo.task_yamls()[demo.task_name(skill)].read_text())
        assert config["output_type"] == "generate_until"
        assert config["generation_kwargs"]["until"] == ["\n"] and config["generation_kwargs"]["do_sample"] is False
        assert config["metric_list"][0]["metric"] == "exact_match"
    mc = yaml.safe_load(demo.task_yamls()[demo.MC_TASK].read_text())
    assert mc["output_type"] == "multiple_choice"
    for row in _rows(_data_files(demo.task_yamls()[demo.MC_TASK])["test"]):
        assert len(set(row["choices"])) == 4 and row["choices"][row["label"]] == row["prompt"][4:-1][::-1]


def test_committed_task_files_are_what_the_generators_write(tmp_path):
    for written in demo.write_tasks(tmp_path):
        relative = written.relative_to(tmp_path)
        assert written.read_text() == (demo.TASKS_DIR / relative).read_text(), relative
    assert (demo.TASKS_DIR / demo.HELD_OUT_TEXT).stat().st_size > 1000


def test_training_data_never_shows_an_evaluated_prompt():
    tokenizer = demo.train_tokenizer()
    held_out = demo.held_out_prompts()
    batches = demo.pretrain_batches(demo.DEFAULT_SPEC, tokenizer, held_out)
    for _ in range(20):
        ids, _, _ = next(batches)
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        assert not {text.split("=")[0] + "=" for text in texts} & held_out


# --- the family -----------------------------------------------------------------------------------------------

def test_each_finetune_masters_its_own_skill_and_no_other_while_the_base_masters_none(family, loaded):
    tokenizer, models = loaded
    skills = list(family.finetunes)
    assert len(skills) >= 3
    own = {s: s for s in skills} | {demo.conflicting_name(s): s for s in family.manifest["spec"]["conflicting"]}
    for name, model in models.items():
        scores = demo.score_skills(model, tokenizer, skills, "test")
        assert scores == {s: family.manifest["models"][name]["scores"]["test"][s] for s in skills}
        for skill, score in scores.items():
            assert (score >= 0.6) if skill == own.get(name) else (score <= 0.25), (name, skill, score)


def test_the_greedy_replay_finetune_fights_the_others_so_equal_weights_are_not_enough(family):
    """The family has a second reversal fine-tune trained on the base's greedy answers: alone it is a fine
    reversal model, but an equal-weight merge of all fine-tunes loses skills that the clean merge keeps,
    which is the work left for the search."""
    manifest = family.manifest
    assert set(family.conflicting) == {demo.conflicting_name(s) for s in manifest["spec"]["conflicting"]}
    assert manifest["equal_weights_all_finetunes"]["average"] <= manifest["best_merge"]["average"] - 0.2


def test_multiple_choice_task_separates_the_reversal_finetune_from_the_base(family):
    scores = {name: entry["scores"]["test"][f"{demo.MC_SKILL}_mc"] for name, entry in family.manifest["models"].items()}
    assert scores[demo.MC_SKILL] >= 0.6 and scores["base"] <= 0.4, scores


def test_task_arithmetic_merge_beats_every_source_average_by_a_wide_margin(family, loaded):
    tokenizer, models = loaded
    skills = list(family.finetunes)
    best = family.manifest["best_merge"]
    merged = demo.task_arithmetic(models["base"], [models[s] for s in skills], [best["weight"]] * len(skills))
    merged_average = sum(demo.score_skills(merged, tokenizer, skills).values()) / len(skills)
    source_averages = [sum(entry["scores"]["test"][s] for s in skills) / len(skills)
                       for entry in family.manifest["models"].values()]
    assert merged_average == pytest.approx(best["average"], abs=1e-4)  # the manifest keeps 4 decimals
    assert merged_average >= max(source_averages) + 0.2, (merged_average, source_averages)


def test_checkpoints_load_offline_as_llama_with_their_tokenizer(family, loaded):
    tokenizer, models = loaded
    for name, path in family.models.items():
        assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
        assert models[name].config.model_type == "llama"
    assert tokenizer.decode(tokenizer("rev abcd=dcba\n")["input_ids"]) == "rev abcd=dcba\n"


def test_lm_eval_scores_the_yaml_tasks_like_the_builder(family, loaded):
    from evaluators.lm_eval_evaluator import LmEvalEvaluator

    tokenizer, models = loaded
    names = [demo.task_name("cap"), demo.MC_TASK]
    scores = LmEvalEvaluator(names, include_path=demo.TASKS_DIR, split="test").score(models["cap"], tokenizer)
    expected = family.manifest["models"]["cap"]["scores"]["test"]
    # lm-eval pads batches on the left, so a near-tie may rarely resolve differently than unpadded greedy
    assert scores.value(names[0], "exact_match") == pytest.approx(expected["cap"], abs=0.03)
    assert scores.value(names[1], "acc") == pytest.approx(expected[f"{demo.MC_SKILL}_mc"], abs=0.03)


def test_second_build_with_the_same_spec_returns_the_cached_family_at_once(family):
    start = time.perf_counter()
    again = demo.build_zoo(family.dir)
    assert time.perf_counter() - start < 2
    assert again.manifest == family.manifest and again.models == family.models


def test_manifest_records_spec_seeds_and_a_spec_and_code_digest(family):
    manifest = family.manifest
    spec = demo.default_spec()
    assert manifest["spec"] == json.loads(json.dumps(asdict(spec)))
    assert manifest["digest"] == spec.digest() != replace(spec, seed=spec.seed + 1).digest()
    assert set(manifest["seeds"]) == {"base", "tasks", *family.finetunes, *family.conflicting}
    # CPU time, not wall time: the limit is for 2 idle cores, and tests often share them
    assert manifest["build_cpu_seconds"] < 360


def test_cli_zoo_build_quiet_prints_the_summary_and_no_training_log(family, monkeypatch, capsys):
    def build(directory, log):
        log("base: step 1/2000 loss 4.2")
        return family

    monkeypatch.setattr(demo, "build_zoo", build)
    assert main(["zoo", "build", str(family.dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "step 1/2000" not in out and "test-split scores" in out


def test_cli_zoo_build_moe_ready_names_each_skills_expert(family, capsys):
    assert main(["zoo", "build", str(family.dir), "--quiet", "--moe-ready"]) == 0
    out = capsys.readouterr().out
    for skill, expert in demo.ensure_moe_ready_experts(family).items():
        assert expert["path"] == family.dir / demo.MOE_READY_DIR / skill and expert["scores"][skill] >= 0.95
        assert f"moe-ready expert {skill}: {expert['path']} (test split, {skill}: {expert['scores'][skill]:.2f})" in out


# --- bad input ------------------------------------------------------------------------------------------------

def test_building_into_a_file_is_an_error_and_the_cli_exits_2(tmp_path, capsys):
    target = tmp_path / "not_a_dir"
    target.write_text("x")
    with pytest.raises(EvomergeError, match="is a file"):
        demo.build_zoo(target)
    assert main(["zoo", "build", str(target)]) == 2
    assert "error:" in capsys.readouterr().err


def test_building_into_a_foreign_directory_refuses_to_overwrite_it(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(EvomergeError, match="not a zoo directory"):
        demo.build_zoo(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_zoo_seed_comes_from_the_environment_and_a_bad_one_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(demo.ZOO_SEED_ENV, "7")
    assert demo.default_spec() == replace(demo.DEFAULT_SPEC, seed=7)
    monkeypatch.delenv(demo.ZOO_SEED_ENV)
    assert demo.default_spec() == demo.DEFAULT_SPEC
    for bad in ("one", "-1"):
        monkeypatch.setenv(demo.ZOO_SEED_ENV, bad)
        assert main(["zoo", "build", str(tmp_path / "zoo")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"EVOMERGE_ZOO_SEED={bad!r}" in err[0], err
        assert not (tmp_path / "zoo").exists()


def test_unknown_skill_is_an_error(tmp_path):
    with pytest.raises(EvomergeError, match="skills"):
        demo.build_zoo(tmp_path / "zoo", replace(demo.DEFAULT_SPEC, skills=("rev", "sing")))
