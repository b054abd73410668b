"""``evomerge eval``: score one model directory, print a table, optionally write the ``Scores`` JSON."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

from evaluators.base import Scores
from merge_core.checkpoint import check_writable_dir
from merge_core.errors import EvomergeError


def run_eval(args: argparse.Namespace) -> int:
    from evaluators.lm_eval_evaluator import LmEvalEvaluator
    from evaluators.loading import load_model
    from evaluators.perplexity import PerplexityEvaluator

    output = Path(args.output) if args.output else None
    if output is not None:  # before minutes of scoring, not after
        if output.is_dir():
            raise EvomergeError(f"--output {output} is a directory; give a file name")
        check_writable_dir(output.parent, "--output")
    evaluators = []
    if args.tasks:
        evaluators.append(LmEvalEvaluator(args.tasks, include_path=args.include_path,
                                          split=None if args.split == "default" else args.split, limit=args.limit,
                                          num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                                          apply_chat_template=args.apply_chat_template, device=args.device,
                                          threads=args.threads))
    if args.perplexity:
        evaluators.append(PerplexityEvaluator(args.perplexity, device=args.device))
    if not evaluators:
        raise EvomergeError("nothing to score: give --tasks and/or --perplexity")
    model, tokenizer = load_model(args.model_dir, device=args.device)
    scores = Scores(tasks={})
    for evaluator in evaluators:
        scores = scores.merged(evaluator.score(model, tokenizer))
    print_scores(scores, title=f"{args.model_dir} ({args.split} split)")
    if output is not None:
        write_json_atomically(output, scores.to_dict())
        print(f"scores written to {output}")
    return 0


def write_json_atomically(path: Path, data: object) -> None:
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
        raise EvomergeError(f"--output {path}: cannot write it ({exc.strerror})") from None


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
