"""What ``--tie-break mergekit`` costs against the default ``index`` rule, per tensor, for each
magnitude-sparsifying method.

Merges one bf16 tensor of a real published shape (default: a Llama-3.2-1B MLP projection, 8192 x 2048)
from a base and three fine-tunes (base + small random deltas, so many |deltas| tie in bf16) with ties,
breadcrumbs and breadcrumbs_ties, density 0.5, once per rule, and prints the median wall and CPU seconds
of ``--repeats`` runs, their ratio, and how many entries the two rules' outputs differ in.

    python benchmarks/tie_break.py                      # ~1 min
    python benchmarks/tie_break.py --shape 2048x2048    # an attention projection
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merge_core.methods import TensorContext, get_method  # noqa: E402

METHODS = {"ties": {}, "breadcrumbs": {"gamma": 0.01}, "breadcrumbs_ties": {"gamma": 0.01}}


def timed(fn, repeats: int) -> tuple[float, float, torch.Tensor]:
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8192x2048", help="tensor shape, ROWSxCOLS (default: 8192x2048)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.shape.split("x"))
    gen = torch.Generator().manual_seed(0)
    base = (0.02 * torch.randn(shape, generator=gen)).bfloat16()
    tensors = [base] + [(base.float() + 0.002 * torch.randn(shape, generator=gen)).bfloat16() for _ in range(3)]
    print("| method | index s (CPU s) | mergekit s (CPU s) | wall ratio | entries differing |")
    print("| --- | --- | --- | --- | --- |")
    for name, extra in METHODS.items():
        method = get_method(name)
        model_params = [{}] + [{"weight": 1 / 3, "density": 0.5, **extra} for _ in range(3)]
        params = dict(method.params)
        runs = {}
        for rule in ("index", "mergekit"):
            def run(rule=rule):
                return method.fn(tensors, 0, model_params, params, TensorContext(name="bench", tie_break=rule))
            runs[rule] = timed(run, args.repeats)
        (wi, ci, ri), (wm, cm, rm) = runs["index"], runs["mergekit"]
        print(f"| {name} | {wi:.2f} ({ci:.2f}) | {wm:.2f} ({cm:.2f}) | {wm / wi:.1f}x | "
              f"{int((ri != rm).sum())} of {ri.numel()} |")


if __name__ == "__main__":
    main()
