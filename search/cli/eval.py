"""`evomerge eval`: score one model directory, print a table, optionally write the ``Scores`` JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from merge_core.checkpoint import check_writable_dir
from merge_core.errors import EvomergeError


def run(args: argparse.Namespace) -> int:
    from evaluators.command import print_scores, score_model_dir, write_json_atomically

    output = Path(args.output) if args.output else None
    if output is not None:  # before minutes of scoring, not after
        if output.is_dir():
            raise EvomergeError(f"--output {output} is a directory; give a file name")
        check_writable_dir(output.parent, "--output")
    scores = score_model_dir(args.model_dir, tasks=args.tasks, include_path=args.include_path,
                             split=None if args.split == "default" else args.split, limit=args.limit,
                             num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                             apply_chat_template=args.apply_chat_template, perplexity=args.perplexity,
                             device=args.device, threads=args.threads,
                             fewshot_as_multiturn=args.fewshot_as_multiturn or None,
                             system_instruction=args.system_instruction,
                             gen_kwargs=_pairs(args.gen_kwargs, "--gen-kwargs"),
                             model_args=_pairs(args.model_args, "--model-args"))
    print_scores(scores, title=f"{args.model_dir} ({args.split} split)")
    if output is not None:
        write_json_atomically(output, scores.to_dict(), "--output")
        print(f"scores written to {output}")
    return 0


def _pairs(text: str | None, flag: str) -> dict:
    """``key=value,key=value`` as lm-eval parses it (numbers and booleans typed)."""
    from lm_eval.utils import simple_parse_args_string

    if not text:
        return {}
    if any("=" not in part for part in text.split(",") if part):
        raise EvomergeError(f"{flag}: {text!r}: expected key=value pairs separated by commas")
    return simple_parse_args_string(text)


def add(sub) -> None:
    from evaluators.tasks import DEFAULT_INCLUDE_PATH

    p = sub.add_parser("eval", help="score a model directory on lm-eval tasks and/or held-out perplexity")
    p.add_argument("model_dir", help="Hugging Face model directory (config, weights and tokenizer), or a hub id "
                                     "NAME[@REVISION] in the local cache")
    p.add_argument("--tasks", default=None, help="comma-separated task names (project tasks or standard lm-eval ones)")
    p.add_argument("--include-path", default=str(DEFAULT_INCLUDE_PATH),
                   help="directory of task YAMLs (default: the project's configs/tasks)")
    p.add_argument("--split", default="search",
                   help="data split scored: search (default), test, another split of the tasks' data, "
                        "or 'default' for each task's own test split")
    p.add_argument("--limit", type=float, default=None,
                   help="score only the first N items of each task (below 1: a fraction)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's own)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--apply-chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--fewshot-as-multiturn", action="store_true",
                   help="few-shot examples as chat turns (needs --apply-chat-template)")
    p.add_argument("--system-instruction", default=None, help="system prompt before every request")
    p.add_argument("--gen-kwargs", default=None, metavar="K=V,...",
                   help="generation settings, e.g. max_gen_toks=64,until=\\n (greedy only: no sampling)")
    p.add_argument("--model-args", default=None, metavar="K=V,...",
                   help="lm-eval HF model arguments, e.g. dtype=bfloat16,revision=main,max_length=2048")
    p.add_argument("--perplexity", default=None, metavar="FILE", help="also score perplexity of this text file")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads while scoring (default: torch's; 1 helps on a CPU shared with busy processes)")
    p.add_argument("--output", default=None, help="write the scores (with per-sample values) to this JSON file")
    p.set_defaults(func=run)
