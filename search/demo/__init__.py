"""The demo model family: a tiny Llama base and one fine-tune per skill, trained on CPU in minutes.

Real LLM fine-tunes mostly *elicit* what pretraining already put in the base, which is why merging them
works. The zoo reproduces that regime on purpose. The base's pretraining text shows every skill (reverse,
capitalise, shift letters by one) answered correctly and, more often, in a competing "sloppy" convention of
its own (the word echoed, echoed, shifted back), so the base computes every skill yet answers sloppily
(exact match near 0). Each fine-tune is a low-rank (LoRA, folded into the weights) update that flips one
skill's preference, with KL replay to the base on the other skills so it leaves them as they were. Small,
skill-specific deltas add up: a task-arithmetic merge ``base + sum(w * delta)`` keeps most of every skill,
which is what the demo's merge search has to find.

The modules, lowest first (each imports only those above it):

- ``spec``: ``ZooSpec``, the build's parameters, and its ``digest()``, the cache key;
- ``items``: the skills, their item generators, task splits and held-out prompts;
- ``scoring``: greedy answers, exact match, multiple-choice accuracy, task arithmetic, the manifest's figures;
- ``training``: tokenizer, base and its competence check, LoRA fine-tunes, MoE-ready experts, the build;
- ``task_files``: the lm-eval task YAMLs and JSONL splits under ``configs/tasks``;
- ``zoo``: the cached family on disk (``build_zoo``, ``ensure_zoo``, the manifest, the summary).

Only ``items``, ``scoring`` and ``training`` are in the cache key: editing the task files' writer, the cache
or the summary returns the family already built instead of training it again.
"""

from search.demo.items import MC_SKILL, SKILLS, TASK_SEED, Item, eval_items, held_out_prompts, mc_choices, mc_items
from search.demo.scoring import (
    MAX_ANSWER_TOKENS,
    exact_match,
    greedy_answers,
    mc_accuracy,
    score_model,
    score_skills,
    task_arithmetic,
)
from search.demo.spec import DEFAULT_SPEC, TRAINING_CODE, ZOO_SEED_ENV, ZooSpec, default_spec
from search.demo.task_files import (
    HELD_OUT_TEST_TEXT,
    HELD_OUT_TEXT,
    MC_TASK,
    TASKS_DIR,
    task_name,
    task_yamls,
    write_tasks,
)
from search.demo.training import (
    conflicting_name,
    deterministic_torch,
    finetune,
    pretrain,
    pretrain_batches,
    train_family,
    train_tokenizer,
)
from search.demo.zoo import (
    DEFAULT_ZOO_DIR,
    MOE_READY_DIR,
    ZOO_CACHE_ENV,
    Zoo,
    build_zoo,
    ensure_moe_ready_experts,
    ensure_zoo,
    project_root,
    summary,
)

__all__ = [
    "DEFAULT_SPEC", "DEFAULT_ZOO_DIR", "HELD_OUT_TEST_TEXT", "HELD_OUT_TEXT", "MAX_ANSWER_TOKENS", "MC_SKILL",
    "MC_TASK", "MOE_READY_DIR",
    "SKILLS", "TASKS_DIR", "TASK_SEED", "TRAINING_CODE", "ZOO_CACHE_ENV", "ZOO_SEED_ENV",
    "Item", "Zoo", "ZooSpec",
    "build_zoo", "conflicting_name", "default_spec", "deterministic_torch", "ensure_moe_ready_experts", "ensure_zoo",
    "eval_items", "exact_match", "finetune", "greedy_answers", "held_out_prompts", "mc_accuracy", "mc_choices",
    "mc_items", "pretrain", "pretrain_batches", "project_root", "score_model", "score_skills", "summary",
    "task_arithmetic", "task_name", "task_yamls", "train_family", "train_tokenizer", "write_tasks",
]
