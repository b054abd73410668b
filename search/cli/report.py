"""`evomerge report`: best recipe, leaderboard, plots and HTML page of a search."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from search.report import write_report

    report = write_report(args.run_dir, storage=args.storage, study_name=args.study_name, top_k=args.top_k,
                          test=not args.no_test, merge=args.merge, progress=True)
    print(f"report: {report}")
    print(f"best recipe: {report.parent / 'best_recipe.yaml'}")
    if args.merge:
        print(f"best model: {report.parent / 'best_model'}")
    return 0


def add(sub) -> None:
    p = sub.add_parser("report", help="best recipe, leaderboard, plots and HTML page of a search (safe while it runs)")
    p.add_argument("run_dir", help="the search's run directory (holds study.db unless --storage is given)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite RUN_DIR/study.db)")
    p.add_argument("--study-name", default=None, help="study name (default: the storage's only study)")
    p.add_argument("--top-k", type=int, default=3,
                   help="leaderboard rows and exported recipes for the N best trials (default: 3)")
    p.add_argument("--merge", action="store_true", help="also merge the best recipe to RUN_DIR/best_model")
    p.add_argument("--no-test", action="store_true", help="skip test-split scoring (search-split columns only)")
    p.set_defaults(func=run)
