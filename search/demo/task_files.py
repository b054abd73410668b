"""The demo family's lm-eval tasks: the YAML configs and JSONL splits under ``configs/tasks`` (``evomerge zoo
tasks`` rewrites them), and the task names the manifest maps its score columns to.

The files are a view of ``items``: they change no model, so this module is not part of the build's cache
key (see ``search.demo.spec``); ``test_committed_task_files_are_what_the_generators_write`` keeps the
committed files in step with it instead.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from evaluators.tasks import DEFAULT_INCLUDE_PATH
from merge_core.errors import EvomergeError
from search.demo.items import MC_SKILL, SKILLS, TASK_SEED, Item, eval_items, held_out_prompts, mc_choices, mc_items
from search.demo.scoring import MAX_ANSWER_TOKENS
from search.demo.spec import DEFAULT_SPEC

TASKS_DIR = DEFAULT_INCLUDE_PATH


def task_name(skill: str) -> str:
    return f"zoo_{skill}"


MC_TASK = task_name(f"{MC_SKILL}_mc")
HELD_OUT_TEXT = "data/heldout.txt"
HELD_OUT_TEST_TEXT = "data/heldout_test.txt"  # other unseen prompts: the held-out text's test split
TEXT_TASK = task_name("text")  # the held-out texts as an lm-eval perplexity task, one document per line


def score_tasks(skills) -> dict[str, str]:
    """Score column (a skill, or the multiple-choice one) -> the lm-eval task that measures it."""
    return {skill: task_name(skill) for skill in skills} | {f"{MC_SKILL}_mc": MC_TASK}


def _task_yaml(comment: str, task: str, stem: str, output_type: str, body: str) -> str:
    """A task YAML: the header every demo task shares (JSONL search/test splits under data/), then ``body``."""
    return f"""# Written by `evomerge zoo tasks`: {comment}
task: {task}
tag: [evomerge_zoo]
dataset_path: json
dataset_kwargs:
  data_files:
    search: data/{stem}_search.jsonl
    test: data/{stem}_test.jsonl
test_split: test
output_type: {output_type}
doc_to_text: "{{{{prompt}}}}"
{body}metadata:
  version: 1.0
"""


def _generation_yaml(skill: str) -> str:
    return _task_yaml(f'exact match of the greedy answer to "{skill}" prompts.', task_name(skill), skill,
                      "generate_until", f"""doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: {MAX_ANSWER_TOKENS}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")


def _mc_yaml() -> str:
    return _task_yaml(f'pick the "{MC_SKILL}" answer among near misses by log-likelihood.', MC_TASK,
                      f"{MC_SKILL}_mc", "multiple_choice", """doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")


def _text_yaml() -> str:
    return _task_yaml("perplexity of held-out lines (lower is better), each line one document.", TEXT_TASK, "text",
                      "loglikelihood_rolling", """doc_to_target: "{{text}}"
metric_list:
  - metric: bits_per_byte
  - metric: byte_perplexity
  - metric: word_perplexity
""")


def _mc_row(item: Item, rng: random.Random) -> dict:
    choices = mc_choices(item)
    order = rng.sample(range(len(choices)), len(choices))
    return {"prompt": item.prompt, "choices": [choices[i] for i in order], "label": order.index(0)}


def _held_out_text(lines: int = 200, seed: int = TASK_SEED + 1000, exclude: str = "") -> str:
    """Pretraining-like text (the default mix of correct and sloppy answers) on unseen prompts, none of
    them a prompt of ``exclude`` (another held-out text)."""
    rng = random.Random(seed)
    trained_prompts = held_out_prompts()
    taken = {line.split("=")[0] + "=" for line in exclude.splitlines()}
    rows = []
    while len(rows) < lines:
        item = SKILLS[rng.choice(sorted(SKILLS))](rng)
        if item.prompt not in trained_prompts and item.prompt not in taken:
            rows.append(item.prompt + (item.answer if rng.random() < DEFAULT_SPEC.correct_share else item.sloppy))
    return "\n".join(rows) + "\n"


def write_tasks(tasks_dir: Path = TASKS_DIR) -> list[Path]:
    """(Re)write the lm-eval task YAMLs and their JSONL splits; deterministic, so the committed files
    are reproduced byte for byte."""
    tasks_dir = Path(tasks_dir)
    if tasks_dir.exists() and not tasks_dir.is_dir():
        raise EvomergeError(f"{tasks_dir} is not a directory")
    (tasks_dir / "data").mkdir(parents=True, exist_ok=True)
    written = []

    def write(relative: str, text: str) -> None:
        path = tasks_dir / relative
        path.write_text(text)
        written.append(path)

    def jsonl(rows: list[dict]) -> str:
        return "".join(json.dumps(row) + "\n" for row in rows)

    for skill in SKILLS:
        write(f"{task_name(skill)}.yaml", _generation_yaml(skill))
        for split in ("search", "test"):
            write(f"data/{skill}_{split}.jsonl",
                  jsonl([{"prompt": i.prompt, "answer": i.answer} for i in eval_items(skill, split)]))
    rng = random.Random(TASK_SEED + 200)
    write(f"{MC_TASK}.yaml", _mc_yaml())
    for split in ("search", "test"):
        write(f"data/{MC_SKILL}_mc_{split}.jsonl", jsonl([_mc_row(i, rng) for i in mc_items(split)]))
    texts = {"search": _held_out_text()}
    texts["test"] = _held_out_text(seed=TASK_SEED + 2000, exclude=texts["search"])
    write(HELD_OUT_TEXT, texts["search"])
    write(HELD_OUT_TEST_TEXT, texts["test"])
    write(f"{TEXT_TASK}.yaml", _text_yaml())
    for split, text in texts.items():
        write(f"data/text_{split}.jsonl",
              jsonl([{"prompt": line.split("=")[0] + "=", "text": line} for line in text.splitlines()]))
    return written


def task_yamls(tasks_dir: Path = TASKS_DIR) -> dict[str, Path]:
    """Task name -> YAML path: one generation task per skill and the multiple-choice task."""
    names = [task_name(skill) for skill in SKILLS] + [MC_TASK]
    return {name: Path(tasks_dir) / f"{name}.yaml" for name in names}
