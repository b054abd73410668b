"""Wall time and peak memory of `evomerge merge` vs `mergekit-yaml` on models with real published shapes.

Writes random-weight model families (a base and three fine-tunes = base + small random deltas) with the
exact tensor shapes of Llama-3.2-1B and Qwen2.5-0.5B, cached under ``--workdir``. Then merges each recipe
(linear, slerp, ties, dare_ties; bf16) with both tools, each run in its own subprocess, and prints a table
of wall time, CPU time and peak RSS (the child's ``ru_maxrss``) with evomerge/mergekit ratios. For the
deterministic methods the two outputs are also compared tensor by tensor (largest absolute difference).

Measurements are kept in ``WORKDIR/results.json``: ``--only evomerge`` reuses the last mergekit numbers.
The machine's other load skews wall time; the load average before each run is logged in that file.

    python benchmarks/merge_vs_mergekit.py --shapes tiny                 # quick check (seconds)
    python benchmarks/merge_vs_mergekit.py --markdown results/bench.md   # full run (~10+ minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from merge_core.checkpoint import CheckpointReader, ShardedWriter, atomic_output_dir  # noqa: E402

BIN = Path(sys.executable).parent
TOOLS = ("mergekit", "evomerge")
METHODS = ("linear", "slerp", "ties", "dare_ties")
DETERMINISTIC = ("linear", "slerp", "ties")
FINETUNES = 3
WEIGHT_STD = 0.02  # the configs' initializer_range
DELTA_STD = 0.002  # a fine-tune moves weights by ~10% of their spread

SHAPES = {
    "llama-1b": lambda: LlamaConfig(  # meta-llama/Llama-3.2-1B
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000,
        eos_token_id=128001, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"]),
    "llama-3b": lambda: LlamaConfig(  # meta-llama/Llama-3.2-3B (benchmarks/larger_than_ram.py)
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000,
        eos_token_id=128001, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"]),
    "qwen-0.5b": lambda: Qwen2Config(  # Qwen/Qwen2.5-0.5B
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151643,
        torch_dtype="bfloat16", architectures=["Qwen2ForCausalLM"]),
    "tiny": lambda: LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, tie_word_embeddings=True, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"]),
}

GIB = 2**30


# --------------------------------------------------------------------------------------------- models


def weight_layout(config) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Names and shapes as transformers saves them, found on the meta device (no memory, no init time)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layout = {name: (t.shape, torch.bfloat16) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        layout.pop("lm_head.weight", None)  # saved once, as the embedding
    return layout


def gaussian(shape: torch.Size, seed: int, std: float) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).mul_(std)


def write_model(path: Path, config, layout, index: int) -> None:
    """Model ``index`` 0 is the base; the others are base + their own small random delta."""
    with atomic_output_dir(path, force=True) as staging:
        with ShardedWriter(staging, layout, max_shard_bytes=5 * 10**9) as writer:
            for position, (name, (shape, dtype)) in enumerate(layout.items()):
                weight = gaussian(shape, position, WEIGHT_STD)
                if name.endswith("norm.weight"):
                    weight += 1.0
                if index:
                    weight += gaussian(shape, 10**6 * index + position, DELTA_STD)
                writer.write(name, weight.to(dtype))
        config.save_pretrained(staging)


def model_family(workdir: Path, shape: str) -> list[Path]:
    """Base and fine-tunes of ``shape``, written once and reused (a directory exists only when complete)."""
    config = SHAPES[shape]()
    paths = [workdir / "models" / shape / ("base" if i == 0 else f"ft{i}") for i in range(FINETUNES + 1)]
    missing = [i for i, path in enumerate(paths) if not path.is_dir()]
    if missing:
        layout = weight_layout(config)
        for i in missing:
            started = time.perf_counter()
            write_model(paths[i], config, layout, i)
            print(f"  wrote {paths[i]} in {time.perf_counter() - started:.0f} s", flush=True)
    return paths


# --------------------------------------------------------------------------------------------- recipes


def recipe(method: str, base: Path, finetunes: list[Path]) -> str:
    ft1, ft2, ft3 = finetunes
    if method == "linear":
        body = (f"models:\n  - model: {ft1}\n    parameters: {{weight: 0.5}}\n"
                f"  - model: {ft2}\n    parameters: {{weight: 0.3}}\n"
                f"  - model: {ft3}\n    parameters: {{weight: 0.2}}\n")
    elif method == "slerp":
        body = (f"base_model: {base}\nmodels:\n  - model: {base}\n  - model: {ft1}\nparameters:\n  t:\n"
                "    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
                "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\n")
    else:
        body = (f"base_model: {base}\nmodels:\n"
                + "".join(f"  - model: {ft}\n    parameters: {{density: 0.5, weight: {w}}}\n"
                          for ft, w in zip(finetunes, (0.5, 0.3, 0.2)))
                + "parameters: {normalize: true}\n")
    return f"merge_method: {method}\n{body}dtype: bfloat16\n"


def command(tool: str, recipe_file: Path, out: Path) -> list[str]:
    if tool == "mergekit":
        return [str(BIN / "mergekit-yaml"), str(recipe_file), str(out), "--no-copy-tokenizer", "--quiet"]
    return [str(BIN / "evomerge"), "merge", str(recipe_file), str(out), "--force", "--no-copy-tokenizer", "--quiet"]


# --------------------------------------------------------------------------------------------- measuring


def warm_page_cache(paths: list[Path]) -> None:
    """Both tools start with the inputs in the page cache, so neither pays for the other's first read."""
    buffer = bytearray(64 * 2**20)
    for path in paths:
        for file in path.glob("*.safetensors"):
            with open(file, "rb", buffering=0) as handle:
                while handle.readinto(buffer):
                    pass


# Started with vfork, a child's ru_maxrss begins at its parent's RSS (this script holds GiBs after comparing
# outputs), so each tool is started by this tiny stdlib-only process, whose RSS is ~10 MiB.
MEASURER = """
import json, os, subprocess, sys, time
started = time.perf_counter()
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
json.dump({"wall_s": time.perf_counter() - started, "cpu_s": usage.ru_utime + usage.ru_stime,
           "peak_rss_kib": usage.ru_maxrss}, open(sys.argv[1], "w"))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(cmd: list[str], log: Path) -> dict:
    """Wall time, CPU time and peak RSS of one tool run (``wait4`` gives the tool's own rusage)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    load = os.getloadavg()[0]
    usage_file = log.with_suffix(".usage.json")
    with open(log, "w") as log_file:
        finished = subprocess.run([sys.executable, "-I", "-S", "-c", MEASURER, str(usage_file), *cmd],
                                  stdout=log_file, stderr=subprocess.STDOUT, env=env)
    if finished.returncode:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{' '.join(cmd)} exited with {finished.returncode}: {tail[0]} (log: {log})")
    usage = json.loads(usage_file.read_text())
    return {"wall_s": usage["wall_s"], "cpu_s": usage["cpu_s"], "peak_rss_gib": usage["peak_rss_kib"] * 1024 / GIB,
            "load_before": load, "when": time.strftime("%Y-%m-%d %H:%M")}


def max_abs_difference(a: Path, b: Path) -> float | str:
    left, right = CheckpointReader(a), CheckpointReader(b)
    if set(left.names) != set(right.names):
        return f"names differ: {sorted(set(left.names) ^ set(right.names))[:3]}"
    return max(float((left.get(n, torch.float32) - right.get(n, torch.float32)).abs().max()) for n in left.names)


# --------------------------------------------------------------------------------------------- reporting


def table(results: dict, shapes: list[str], methods: list[str]) -> str:
    import pandas as pd

    rows = []
    for shape in shapes:
        for method in methods:
            runs = {tool: results.get(f"{shape}/{method}/{tool}") for tool in TOOLS}
            row = {"shape": shape, "method": method}
            for tool, run in runs.items():
                row[f"{tool} s"] = f"{run['wall_s']:.1f}" if run else ""
                row[f"{tool} cpu-s"] = f"{run['cpu_s']:.0f}" if run else ""
                row[f"{tool} GiB"] = f"{run['peak_rss_gib']:.2f}" if run else ""
            if all(runs.values()):
                row["time ratio"] = f"{runs['evomerge']['wall_s'] / runs['mergekit']['wall_s']:.2f}"
                row["RSS ratio"] = f"{runs['evomerge']['peak_rss_gib'] / runs['mergekit']['peak_rss_gib']:.2f}"
            difference = results.get(f"{shape}/{method}/max_abs_diff")
            row["max abs diff"] = (f"{difference:.3g}" if isinstance(difference, float) else difference or "")
            rows.append(row)
    return pd.DataFrame(rows).to_markdown(index=False)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="llama-1b,qwen-0.5b", help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}")
    parser.add_argument("--only", choices=TOOLS, help="run one tool (the table reuses the other's last numbers)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/evomerge-bench"),
                        help="model cache, outputs, logs and results.json (default: /tmp/evomerge-bench)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this Markdown file")
    parser.add_argument("--keep-outputs", action="store_true",
                        help="keep merged models (to compare with a later --only run of the other tool)")
    args = parser.parse_args(argv)
    args.shapes = args.shapes.split(",")
    args.methods = args.methods.split(",")
    for value, known, flag in ((args.shapes, SHAPES, "--shapes"), (args.methods, METHODS, "--methods")):
        unknown = sorted(set(value) - set(known))
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    tools = [args.only] if args.only else list(TOOLS)
    workdir = args.workdir.resolve()
    for folder in ("recipes", "logs", "out"):
        (workdir / folder).mkdir(parents=True, exist_ok=True)
    results_file = workdir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for shape in args.shapes:
        print(f"{shape}: preparing models", flush=True)
        base, *finetunes = model_family(workdir, shape)
        for method in args.methods:
            recipe_file = workdir / "recipes" / f"{shape}-{method}.yml"
            recipe_file.write_text(recipe(method, base, finetunes))
            outputs = {tool: workdir / "out" / shape / method / tool for tool in TOOLS}
            for tool in tools:
                shutil.rmtree(outputs[tool], ignore_errors=True)
                warm_page_cache([base, *finetunes])
                log = workdir / "logs" / f"{shape}-{method}-{tool}.log"
                run = run_measured(command(tool, recipe_file, outputs[tool]), log)
                results[f"{shape}/{method}/{tool}"] = run
                print(f"  {method:9s} {tool:8s} {run['wall_s']:7.1f} s  {run['cpu_s']:7.1f} cpu-s  "
                      f"{run['peak_rss_gib']:6.2f} GiB  (load before {run['load_before']:.1f})", flush=True)
                results_file.write_text(json.dumps(results, indent=2))
            if method in DETERMINISTIC and all(out.is_dir() for out in outputs.values()):
                results[f"{shape}/{method}/max_abs_diff"] = max_abs_difference(*outputs.values())
                results_file.write_text(json.dumps(results, indent=2))
            if not args.keep_outputs:
                for tool in tools:
                    shutil.rmtree(outputs[tool], ignore_errors=True)
    report = table(results, args.shapes, args.methods)
    print(f"\n{report}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"{report}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
