"""Host memory of a search over LoRA adapters vs over dense fine-tunes of the same shape.

Writes (once, under --workdir) a random bf16 Llama (hidden 1024, 8 layers, intermediate 2816, vocab 32000,
untied head: 0.17 B parameters), three PEFT LoRA adapters of it (rank 16, alpha 32, every linear projection)
and three dense fine-tunes (base + a random delta). Then, each in a fresh subprocess, opens the search
workbench (``search.loop.open_workbench``: every source read into memory, plus the live model) over the
three adapters and over the three fine-tunes, and merges one candidate (task_arithmetic, weights 0.5) into
the live model without the search's task-vector cache: every source tensor is then read once, as the
first trial reads them (memory-mapped pages of dense sources count only once read). Prints each child's
peak RSS (``VmHWM``, which unlike ``ru_maxrss`` starts afresh at exec) after its imports, after opening and
after the merge. Linux only.

    python benchmarks/lora_sources.py [--workdir /tmp/evomerge-lora-bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

N_SOURCES = 3
RANK = 16


def build(workdir: Path) -> dict[str, list[Path] | Path]:
    """The base, the adapters and the dense fine-tunes, written once and reused."""
    import peft
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.families import tokenizer

    base = workdir / "base"
    adapters = [workdir / f"lora{i}" for i in range(1, N_SOURCES + 1)]
    dense = [workdir / f"ft{i}" for i in range(1, N_SOURCES + 1)]
    if all((p / "config.json").is_file() for p in [base, *dense]) and all(
            (p / "adapter_model.safetensors").is_file() for p in adapters):
        return {"base": base, "adapters": adapters, "dense": dense}
    shutil.rmtree(workdir, ignore_errors=True)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base)
    tokenizer().save_pretrained(base)
    weights = load_file(base / "model.safetensors")
    for i, path in enumerate(dense, start=1):
        gen = torch.Generator().manual_seed(i)
        path.mkdir()
        shutil.copy2(base / "config.json", path / "config.json")
        save_file({n: (t.float() + 0.01 * torch.randn(t.shape, generator=gen)).to(t.dtype) for n, t in weights.items()},
                  path / "model.safetensors", metadata={"format": "pt"})
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for i, path in enumerate(adapters, start=1):
        model = peft.get_peft_model(LlamaForCausalLM.from_pretrained(base),
                                    peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets))
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(path)
    return {"base": base, "adapters": adapters, "dense": dense}


def megabytes(paths: list[Path]) -> float:
    return sum(f.stat().st_size for p in paths for f in p.glob("*.safetensors")) / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident set since it was exec'd (``VmHWM``), in MiB."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def open_once(workdir: Path, kind: str) -> None:
    """The child: open the workbench over one kind of source, print its figures as JSON."""
    from merge_core import load_recipe, merge_into
    from search.config import SearchConfig
    from search.loop import open_workbench

    before = peak_rss_mb()
    models = sorted(str(p) for p in workdir.glob("lora*" if kind == "adapters" else "ft*"))
    config = SearchConfig.model_validate({
        "base_model": str(workdir / "base"), "models": models, "method": "task_arithmetic", "dtype": "bfloat16",
        "parameters": {"weight": {"low": 0.0, "high": 1.0}}, "tasks": [{"name": "unused"}],
        "output_dir": str(workdir / "run")})
    start = time.perf_counter()
    bench = open_workbench(config, evaluator=object())
    opened, seconds = peak_rss_mb(), time.perf_counter() - start
    start = time.perf_counter()
    recipe = load_recipe(bench.recipe({d.key: 0.5 for d in bench.dims}), strict=True)
    merge_into(bench.model, recipe, bench.sources, device=config.device)  # no search cache: sources alone
    print(json.dumps({"before_mb": before, "opened_mb": opened, "open_s": seconds, "merged_mb": peak_rss_mb(),
                      "merge_s": time.perf_counter() - start}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/evomerge-lora-bench"))
    parser.add_argument("--child", choices=("adapters", "dense"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        open_once(args.workdir, args.child)
        return 0
    paths = build(args.workdir)
    print(f"base: {megabytes([paths['base']]):.0f} MB of bf16 weights; {N_SOURCES} sources each, "
          f"search dtype bfloat16, cpu\n")
    print("| sources | on disk MB | RSS after imports MB | peak RSS, workbench open MB | open s "
          "| peak RSS, one candidate merged MB | merge s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind in ("adapters", "dense"):
        child = subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir), "--child", kind],
                               capture_output=True, text=True, check=True, cwd=REPO)
        f = json.loads(child.stdout.strip().splitlines()[-1])
        label = f"{N_SOURCES} LoRA adapters (r={RANK})" if kind == "adapters" else f"{N_SOURCES} dense fine-tunes"
        print(f"| {label} | {megabytes(paths[kind]):.0f} | {f['before_mb']:.0f} | {f['opened_mb']:.0f} | "
              f"{f['open_s']:.1f} | {f['merged_mb']:.0f} | {f['merge_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
