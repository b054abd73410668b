"""`evomerge demo`: the main job on the built-in family: build it (cached), search (resumes), report."""

from __future__ import annotations

import argparse

from merge_core.checkpoint import check_writable_dir


def run(args: argparse.Namespace) -> int:
    """The main job on the built-in family: build it (cached), search (resumes), report."""
    from pathlib import Path

    from evaluators.tasks import CONFIGS_DIR, DEFAULT_INCLUDE_PATH
    from search.cli.search import print_outcome
    from search.cli.zoo import no_stray_lock
    from search.config import load_search_config
    from search.demo import build_zoo, project_root
    from search.loop import search
    from search.report import parse_storage_url, write_report

    config_path = Path(args.config)
    shipped = config_path.resolve() == (CONFIGS_DIR / "demo.yaml").resolve()
    # the shipped config's paths are relative to the project (the checkout, or the current directory of an
    # installed evomerge), a user's config's to the directory above its own
    root = project_root() if shipped else config_path.resolve().parent.parent
    config = load_search_config(config_path)
    if args.storage is not None:
        parse_storage_url(args.storage)
    zoo_dir = root / "results" / "zoo"
    check_writable_dir(root / "results", "results directory")
    print(f"1/3 demo family in {zoo_dir} (built once, then cached)", flush=True)
    with no_stray_lock(zoo_dir):
        build_zoo(zoo_dir, log=lambda message: print(f"    {message}", flush=True))
    print(f"2/3 search: {config.n_trials} trials of {config.method} over {len(config.models)} fine-tunes, "
          f"study in {config.storage_url} (running again resumes)", flush=True)
    include = (DEFAULT_INCLUDE_PATH if shipped and config.include_path == "configs/tasks"
               else root / config.include_path if config.include_path else None)
    config = config.model_copy(update={"output_dir": str(root / config.run_dir), "storage": args.storage,
                                       "include_path": str(include) if include else None})
    study = search(config, config_dir=root, progress=not args.quiet)
    print_outcome(study)
    print("3/3 report", flush=True)
    report = write_report(config.run_dir, storage=config.storage_url, study_name=config.study)
    print(f"report: {report}\nleaderboard: {config.run_dir / 'leaderboard.md'}\n"
          f"best recipe: {config.run_dir / 'best_recipe.yaml'}")
    print(demo_figures(config.run_dir / "leaderboard.csv"))
    return 0


def demo_figures(leaderboard_csv) -> str:
    """The demo's headline figures (objective per split) from its leaderboard: the family is trained on the
    user's CPU, whose float kernels shape it, so these vary by machine within the README's ranges."""
    import csv
    from pathlib import Path

    rows = list(csv.DictReader(Path(leaderboard_csv).read_text().splitlines()))
    splits = [split for split in ("search", "test") if rows and f"average ({split})" in rows[0]]

    def average(row: dict, split: str) -> float:
        return float(row[f"average ({split})"])

    picked = [("best source", max((r for r in rows if r["role"] == "source"), key=lambda r: average(r, "search"),
                                  default=None)),
              ("hand-written", next((r for r in rows if "hand-written" in r["role"].split(", ")), None)),
              ("best", next((r for r in rows if "best" in r["role"].split(", ")), None))]
    lines = ["figures of this run (they vary by machine: README, \"What the demo shows\"):"]
    for label, row in picked:
        if row is not None:
            lines.append(f"  {label:<13}{row['model']:<10}"
                         + "".join(f"  {split} {average(row, split):.3f}" for split in splits))
    return "\n".join(lines)


def add(sub) -> None:
    from evaluators.tasks import CONFIGS_DIR

    default = CONFIGS_DIR / "demo.yaml"
    p = sub.add_parser("demo", help="build the demo family, search merges of it and write the report")
    p.add_argument("--config", default=str(default), help=f"search config (default: {default})")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite under results/demo/)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
