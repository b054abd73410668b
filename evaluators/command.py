"""Score one model directory (what ``evomerge eval`` runs), show the scores, write them as JSON."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from evaluators.base import Scores
from merge_core.errors import EvomergeError


def score_model_dir(model_dir: str | Path, *, tasks: str | list[str] | None = None,
                    include_path: str | Path | None = None, split: str | None = "search",
                    limit: int | float | None = None, num_fewshot: int | None = None, batch_size: int = 32,
                    apply_chat_template: bool = False, perplexity: str | Path | None = None, device: str = "cpu",
                    threads: int | None = None, fewshot_as_multiturn: bool | None = None,
                    system_instruction: str | None = None, gen_kwargs: dict | None = None,
                    model_args: dict | None = None) -> Scores:
    """``model_dir`` (a directory, or a hub id with an optional ``@revision``) scored on lm-eval ``tasks``
    (their ``split``; None: each task's own test split) and/or the perplexity of the text file ``perplexity``,
    every setting checked before the model is loaded. ``model_args``: lm-eval's HF model arguments; the
    loading ones (``dtype``, ``revision``, ``trust_remote_code``) load the model, the rest go to lm-eval."""
    from evaluators.lm_eval_evaluator import LmEvalEvaluator
    from evaluators.loading import LOADER_ARGS, load_model
    from evaluators.perplexity import PerplexityEvaluator

    model_args = dict(model_args or {})
    loading = {k: model_args.pop(k) for k in LOADER_ARGS if k in model_args}
    evaluators = []
    if tasks:
        evaluators.append(LmEvalEvaluator(tasks, include_path=include_path, split=split, limit=limit,
                                          num_fewshot=num_fewshot, batch_size=batch_size,
                                          apply_chat_template=apply_chat_template, device=device, threads=threads,
                                          fewshot_as_multiturn=fewshot_as_multiturn,
                                          system_instruction=system_instruction, gen_kwargs=gen_kwargs,
                                          model_args=model_args))
    if perplexity:
        evaluators.append(PerplexityEvaluator(perplexity, device=device))
    if not evaluators:
        raise EvomergeError("nothing to score: give --tasks and/or --perplexity")
    model, tokenizer = load_model(model_dir, device=device, **loading)
    scores = Scores(tasks={})
    for evaluator in evaluators:
        scores = scores.merged(evaluator.score(model, tokenizer))
    return scores


def write_json_atomically(path: Path, data: object, field: str = "output") -> None:
    """``path`` holds the whole JSON or, after any failure (a full disk), what it held before."""
    created = [p for p in path.parents if not p.exists()][::-1]
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise EvomergeError(f"{field} {path}: cannot write it ({exc.strerror})") from None


def print_scores(scores: Scores, title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or None)
    for column in ("task", "metric", "value", "better", "n"):
        table.add_column(column, justify="right" if column in ("value", "n") else "left")
    for name, task in scores.tasks.items():
        for i, (metric, value) in enumerate(task.metrics.items()):
            table.add_row(name if i == 0 else "", metric, f"{value:.4f}",
                          "higher" if task.higher_is_better[metric] else "lower", str(task.n) if i == 0 else "")
    Console().print(table)
    print(f"scored in {scores.seconds:.2f} s")
