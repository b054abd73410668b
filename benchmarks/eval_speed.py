"""How long one search-time evaluation takes: a ~3M-parameter Llama on the demo tasks, first vs warm call.

Scores the demo tasks (tag ``evomerge_zoo`` in configs/tasks/, written by ``evomerge zoo tasks``; when they are
absent, written afresh to a temporary directory): three generate_until exact-match tasks and one 4-way
multiple-choice task, 60 search items each. The model is ``--model`` or a random 4-layer Llama (hidden 256)
with the zoo's character-level tokenizer; a random model never stops early, so every
generation runs to ``max_gen_toks``: the slow case. Prints task building, first-call and warm per-call seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluators.lm_eval_evaluator import LmEvalEvaluator, offline_defaults  # noqa: E402
from evaluators.tasks import DEFAULT_INCLUDE_PATH  # noqa: E402
from search import demo  # noqa: E402

DEMO_TAG = "evomerge_zoo"


def standin_model():
    """A random 4-layer Llama (hidden 256) with the zoo's character-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = demo.train_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: a random stand-in of the demo's shape)")
    parser.add_argument("--tasks", help=f"comma-separated task names in --include-path (default: {DEMO_TAG} "
                                         "if configs/tasks has it, else stand-in tasks)")
    parser.add_argument("--include-path", default=None, help="task YAML directory (default: configs/tasks)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--calls", type=int, default=5, help="warm calls to time (default: 5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads while scoring (default: torch's own; try 1 on a busy machine)")
    args = parser.parse_args()
    offline_defaults()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        include_path, tasks = args.include_path, args.tasks
        if tasks is None and any(DEMO_TAG in p.read_text() for p in DEFAULT_INCLUDE_PATH.glob("*.yaml")):
            tasks = DEMO_TAG
        if tasks is None:  # the same tasks, written afresh
            include_path = Path(tmp) / "tasks"
            demo.write_tasks(include_path)
            tasks = DEMO_TAG
        if args.model:
            from evaluators.loading import load_model

            model, tokenizer = load_model(args.model)
        else:
            model, tokenizer = standin_model()
        params = sum(p.numel() for p in model.parameters())

        start = time.perf_counter()
        evaluator = LmEvalEvaluator(tasks, include_path=include_path, batch_size=args.batch_size,
                                    threads=args.threads)
        build = time.perf_counter() - start
        first = evaluator.score(model, tokenizer).seconds
        warm = [evaluator.score(model, tokenizer).seconds for _ in range(args.calls)]
        scores = evaluator.score(model, tokenizer)

    items = sum(s.n for s in scores.tasks.values())
    print(f"model: {params / 1e6:.2f}M params, torch threads: {args.threads or torch.get_num_threads()}, "
          f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"tasks: {', '.join(scores.tasks)} ({items} items), batch size {args.batch_size}")
    print(f"task building: {build:.2f} s")
    print(f"first call:    {first:.2f} s (builds prompts, requests, tokenization)")
    print(f"warm call:     {statistics.median(warm):.2f} s median, {min(warm):.2f} s best of {len(warm)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
