"""In-memory materialization of a search candidate vs writing it to disk and loading it, at Llama-3.2-1B shape.

The search materializes each candidate into one live model (``merge_into``); mergekit-evolve without
``--in-memory`` writes every candidate to disk and loads it with ``from_pretrained``. This prints both
for a TIES candidate (3 fine-tunes, density 0.5, bf16; random weights from the family writer of
``merge_vs_mergekit.py``, cached under ``--workdir``). The first candidate also fills the search cache
(task vectors within ``PRECOMPUTE_BYTES``, magnitude histograms); the second one is a typical trial. Last,
a layer-path candidate (``merge_core.routing``) over the same sources.

Memory: the four sources in bf16 (~2.5 GB each), the live model, and the bounded cache.

    python benchmarks/materialize_1b.py
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from merge_vs_mergekit import model_family  # noqa: E402

from merge_core import load_recipe, merge  # noqa: E402
from merge_core.checkpoint import CheckpointReader  # noqa: E402
from merge_core.engine import merge_into  # noqa: E402
from merge_core.memory import TensorSource  # noqa: E402
from merge_core.routing import LayerBank, Slot, assemble, live_model  # noqa: E402
from search.loop import PRECOMPUTE_BYTES  # noqa: E402


def ties_recipe(base: Path, finetunes: list[Path], density: float, weights: list[float]) -> dict:
    return {"merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
            "models": [{"model": str(m), "parameters": {"weight": w, "density": density}}
                       for m, w in zip(finetunes, weights)]}


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/evomerge-bench"))
    parser.add_argument("--shape", default="llama-1b")
    args = parser.parse_args(argv)
    base, *finetunes = model_family(args.workdir.resolve(), args.shape)
    sources = {str(p): TensorSource.load(CheckpointReader(p), dtype=torch.bfloat16) for p in [base, *finetunes]}
    live = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    cache: dict = {}
    first = ties_recipe(base, finetunes, 0.5, [1 / 3] * 3)
    second = ties_recipe(base, finetunes, 0.5, [0.5, 0.3, 0.4])
    materialize = [timed(lambda r=r: merge_into(live, load_recipe(r), sources, cache=cache,
                                                 precompute_bytes=PRECOMPUTE_BYTES)) for r in (first, second)]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        out = Path(tmp) / "candidate"
        to_disk = timed(lambda: merge(load_recipe(second), out, copy_tokenizer=False))
        load = timed(lambda: AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16))
        shutil.rmtree(out)
    print(f"{args.shape}, TIES of {len(finetunes)} fine-tunes at density 0.5, bf16, {torch.get_num_threads()} threads")
    print(f"  in memory, first candidate (fills the cache, {cache.get('precomputed_bytes', 0) / 2**30:.1f} GiB "
          f"precomputed of {PRECOMPUTE_BYTES / 2**30:.0f}): {materialize[0]:6.1f} s")
    print(f"  in memory, next candidate:                             {materialize[1]:6.1f} s")
    print(f"  to disk {to_disk:.1f} s + from_pretrained {load:.1f} s:              {to_disk + load:6.1f} s")
    live = cache = None  # freed before the layer bank is built
    # a layer-path candidate: the sources' modules built once over the same tensors, then repointed per path
    built = time.perf_counter()
    bank = LayerBank(sources, torch.bfloat16)
    routed = live_model(bank, str(base))
    built = time.perf_counter() - built
    layers = bank.num_layers(str(base))
    refs = [str(p) for p in [base, *finetunes]]
    paths = [[Slot(refs[(i + k) % len(refs)], i % layers, 0.9 if i % 3 else 1.0) for i in range(layers + k)]
             for k in range(5)]
    per_path = [timed(lambda p=p: assemble(routed, bank, p)) for p in paths]
    print(f"  layer path of {layers}-{layers + 4} slots from the {len(refs)} models: modules built once in "
          f"{built:.2f} s, then {1000 * sorted(per_path)[2]:.1f} ms per candidate (median of 5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
