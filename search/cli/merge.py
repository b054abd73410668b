"""`evomerge merge`: a mergekit recipe to a checkpoint on disk."""

from __future__ import annotations

import argparse
import sys


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from merge_core import load_recipe, merge

    recipe = load_recipe(args.recipe, strict=args.strict,
                         warn=lambda message: print(f"evomerge merge: warning: {message}", file=sys.stderr))
    out = merge(recipe, args.out_dir, device=args.device, dtype=args.dtype, out_shard_size=args.out_shard_size,
                seed=args.seed, copy_tokenizer=args.copy_tokenizer, force=args.force,
                allow_pickle=args.allow_pickle, progress=not args.quiet, recipe_dir=Path(args.recipe).parent,
                tie_break=args.tie_break)
    print(f"merged model written to {out}")
    return 0


def add(sub) -> None:
    p = sub.add_parser("merge", help="merge a mergekit YAML recipe to disk")
    p.add_argument("recipe", help="mergekit-compatible YAML recipe")
    p.add_argument("out_dir", help="output directory (a Hugging Face checkpoint)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default=None,
                   help="compute/output dtype overriding the recipe's (float32, bfloat16, float16)")
    p.add_argument("--out-shard-size", default="5GB", help="max size of one safetensors shard (default: 5GB)")
    p.add_argument("--seed", type=int, default=None, help="seed for stochastic methods (dare_*, della*)")
    p.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="write the tokenizer to the output (default: yes)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read .bin (pickle) checkpoints with torch.load(weights_only=True)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--strict", action="store_true",
                   help="what mergekit silently ignores (unknown keys, parameters) is an error, not a warning")
    p.add_argument("--tie-break", choices=("index", "mergekit"), default="index",
                   help="which |deltas| tied at a TIES/breadcrumbs threshold are kept: the lowest indices "
                        "(default, the same on every device) or mergekit's CPU sort order (its exact bytes, slower)")
    p.set_defaults(func=run)
