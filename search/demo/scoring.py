"""How the demo family is measured: greedy answers, exact match, multiple-choice accuracy, and the
task-arithmetic merges whose scores go into the manifest.

This is the zoo's own scorer, independent of lm-eval (whose YAML tasks ``task_files`` writes; a test checks
that both agree). Training reads the base's greedy answers for its replay rows and encodes rows with
``encode_rows``, so both live here, below ``training``; the cache key covers this module (see ``search.demo.spec``).
"""

from __future__ import annotations

from typing import Iterable

from search.demo.items import MC_SKILL, Item, eval_items, mc_choices, mc_items
from search.demo.spec import ZooSpec

MAX_ANSWER_TOKENS = 8


def encode_rows(tokenizer, prompts: list[str], answers: list[str], answer_only: bool):
    """Token ids, attention mask and labels for prompt+answer+newline rows (loss on answers if asked)."""
    import torch

    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer([p + a + "\n" for p, a in zip(prompts, answers)], add_special_tokens=False)["input_ids"]
    width = max(map(len, full_ids))
    ids = torch.full((len(full_ids), width), tokenizer.pad_token_id)
    labels = torch.full((len(full_ids), width), -100)
    for row, (prompt, full) in enumerate(zip(prompt_ids, full_ids)):
        ids[row, :len(full)] = torch.tensor(full)
        start = len(prompt) if answer_only else 0
        labels[row, start:len(full)] = torch.tensor(full[start:])
    return ids, (ids != tokenizer.pad_token_id).long(), labels


def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = MAX_ANSWER_TOKENS) -> list[str]:
    """Greedy continuations cut at the first newline, prompts batched by token length (no padding)."""
    import torch

    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(index)
    newline = tokenizer.convert_tokens_to_ids("\n")
    answers = [""] * len(prompts)
    with torch.no_grad():
        for indices in by_length.values():
            ids = torch.tensor([encoded[i] for i in indices])
            start = ids.shape[1]
            for _ in range(max_new_tokens):
                next_ids = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, next_ids], dim=1)
                if (ids[:, start:] == newline).any(1).all():
                    break
            for row, i in enumerate(indices):
                answers[i] = tokenizer.decode(ids[row, start:]).split("\n")[0]
    return answers


def exact_match(model, tokenizer, items: list[Item]) -> float:
    answers = greedy_answers(model, tokenizer, [item.prompt for item in items])
    return sum(a == item.answer for a, item in zip(answers, items)) / len(items)


def score_skills(model, tokenizer, skills: Iterable[str], split: str = "test") -> dict[str, float]:
    return {skill: exact_match(model, tokenizer, eval_items(skill, split)) for skill in skills}


def mc_accuracy(model, tokenizer, items: list[Item]) -> float:
    """Share of items whose correct choice has the highest summed log-likelihood (lm-eval's ``acc``)."""
    import torch

    hits = 0
    with torch.no_grad():
        for item in items:
            choices = mc_choices(item)
            ids, mask, labels = encode_rows(tokenizer, [item.prompt] * len(choices), choices, answer_only=True)
            labels[:, -1] = -100  # the choice alone is scored, not the newline after it
            logprobs = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)[:, :-1]
            targets = labels[:, 1:]
            scored = targets != -100
            picked = logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
            hits += int((picked * scored).sum(1).argmax() == 0)
    return hits / len(items)


def score_model(model, tokenizer, skills: Iterable[str], split: str = "test") -> dict[str, float]:
    """Exact match per skill plus the multiple-choice accuracy, on one split."""
    scores = {skill: exact_match(model, tokenizer, eval_items(skill, split)) for skill in skills}
    scores[f"{MC_SKILL}_mc"] = mc_accuracy(model, tokenizer, mc_items(split))
    return scores


def task_arithmetic(base, finetunes: list, weights: list[float]):
    """``base + sum(w * (finetune - base))`` over every tensor: the merge the family must support."""
    import copy

    import torch

    merged = copy.deepcopy(base)
    state = merged.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            delta = sum(w * (ft.state_dict()[name] - tensor) for ft, w in zip(finetunes, weights))
            tensor.add_(delta)
    return merged


def merge_grid(base, tokenizer, finetunes: dict, spec: ZooSpec) -> list[dict]:
    """Uniform task-arithmetic weights over the single-skill fine-tunes: proof that merging combines skills."""
    rows = []
    for weight in spec.merge_weights:
        merged = task_arithmetic(base, list(finetunes.values()), [weight] * len(finetunes))
        scores = score_skills(merged, tokenizer, spec.skills)
        rows.append({"weight": weight, "scores": scores, "average": _average(scores, spec)})
    return rows


def _average(scores: dict[str, float], spec: ZooSpec) -> float:
    return round(sum(scores[skill] for skill in spec.skills) / len(spec.skills), 4)


def family_figures(base, tokenizer, finetunes: dict, conflicting: dict, spec: ZooSpec) -> dict:
    """What the manifest records of a trained family: each model's scores per split, the merge grid, the
    best source and best merge averages and their margin, and the equal-weight merge of every fine-tune
    (which the conflicting fine-tunes spoil: the work left for the search)."""
    models = {"base": base, **finetunes, **conflicting}
    scores = {name: {split: score_model(model, tokenizer, spec.skills, split) for split in ("search", "test")}
              for name, model in models.items()}
    grid = merge_grid(base, tokenizer, finetunes, spec)
    everything = list(finetunes.values()) + list(conflicting.values())
    naive = score_skills(task_arithmetic(base, everything, [1 / len(everything)] * len(everything)),
                         tokenizer, spec.skills)
    best_source = max(_average(scores[name]["test"], spec) for name in models)
    best_merge = max(grid, key=lambda row: row["average"])
    return {
        "scores": scores,
        "merge_grid": grid,
        "best_source_average": best_source,
        "best_merge": best_merge,
        "merge_margin": round(best_merge["average"] - best_source, 4),
        "equal_weights_all_finetunes": {"scores": naive, "average": _average(naive, spec)},
    }
