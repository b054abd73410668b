"""How long one search-time evaluation takes: a ~3M-parameter Llama on the demo tasks, first vs warm call.

Scores the demo tasks (tag ``evomerge_zoo`` in configs/tasks/, written by ``evomerge zoo tasks``) or, when they
are absent, stand-ins of the same shape written to a temporary directory: three generate_until exact-match tasks
and one 4-way multiple-choice task, 60 search items each. The model is ``--model`` or a random 4-layer Llama
(hidden 256) with a character-level tokenizer like the zoo's; a random model never stops early, so every
generation runs to ``max_gen_toks``: the slow case. Prints task building, first-call and warm per-call seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluators.lm_eval_evaluator import LmEvalEvaluator, offline_defaults  # noqa: E402
from evaluators.tasks import DEFAULT_INCLUDE_PATH  # noqa: E402

DEMO_TAG = "evomerge_zoo"

ITEMS = 60
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 :=+.\n"
GEN_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    search: data/{name}_search.jsonl
    test: data/{name}_search.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
MC_TASK = """task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    search: data/bench_mc_search.jsonl
    test: data/bench_mc_search.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{prompt}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 6)))


def write_standin_tasks(task_dir: Path) -> list[str]:
    rng = random.Random(0)
    (task_dir / "data").mkdir(parents=True)
    makers = {
        "bench_add": lambda: (lambda a, b: (f"add: {a}+{b}=", str(a + b)))(rng.randint(10, 99), rng.randint(10, 99)),
        "bench_rev": lambda: (lambda w: (f"rev: {w}=", w[::-1]))(_word(rng)),
        "bench_cap": lambda: (lambda w: (f"cap: {w}=", w.upper()))(_word(rng)),
    }
    for name, make in makers.items():
        rows = [dict(zip(("prompt", "answer"), make())) for _ in range(ITEMS)]
        (task_dir / "data" / f"{name}_search.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (task_dir / f"{name}.yaml").write_text(GEN_TASK.format(name=name))
    rows = []
    for _ in range(ITEMS):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        choices = [str(a + b), str(a + b)[::-1], str(a + b + 10), str(a + b - 10)]
        rng.shuffle(choices)
        rows.append({"prompt": f"add: {a}+{b}=", "choices": choices, "label": choices.index(str(a + b))})
    (task_dir / "data" / "bench_mc_search.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task_dir / "bench_mc.yaml").write_text(MC_TASK)
    return [*makers, "bench_mc"]


def standin_model():
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.train_from_iterator([ALPHABET], trainer=trainers.BpeTrainer(
        vocab_size=len(ALPHABET) + len(specials), special_tokens=specials, initial_alphabet=list(ALPHABET),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
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
        if tasks is None:
            include_path = Path(tmp) / "tasks"
            tasks = ",".join(write_standin_tasks(include_path))
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
