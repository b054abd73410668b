"""The `evomerge` command line: one subcommand per job, each a thin shell around the library.

Bad input raises ``EvomergeError`` (or a pydantic ``ValidationError``) anywhere below; ``main`` turns it
into one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

from evaluators.lm_eval_evaluator import offline_defaults
from merge_core.checkpoint import check_writable_dir
from merge_core.errors import EvomergeError


def cmd_merge(args: argparse.Namespace) -> int:
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


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge a mergekit YAML recipe to disk")
    p.add_argument("recipe", help="mergekit-compatible YAML recipe")
    p.add_argument("out_dir", help="output directory (a Hugging Face checkpoint)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default=None, help="compute/output dtype overriding the recipe's (float32, bfloat16, float16)")
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
    p.set_defaults(func=cmd_merge)


def _search_config(args: argparse.Namespace):
    from pathlib import Path

    from search.config import load_search_config, with_overrides

    config = load_search_config(args.config)
    flags = {"--storage": args.storage, "--n-trials": args.n_trials, "--timeout": args.timeout,
             "--device": args.device, "--study-name": args.study_name}
    return with_overrides(config, flags), Path(args.config).parent


def cmd_search(args: argparse.Namespace) -> int:
    from search.loop import search

    config, config_dir = _search_config(args)
    study = search(config, config_dir=config_dir, progress=not args.quiet, rerun=_rerun(args))
    _print_outcome(study)
    _require_complete_trial(study)
    if not args.no_report:
        from search.report import write_report

        report = write_report(config.run_dir, storage=config.storage_url, study_name=config.study,
                              progress=not args.quiet)
        print(f"report: {report}")
    return 0


def _print_outcome(study) -> None:
    from optuna.trial import TrialState

    from search.formatting import decimals_for_differences, decimals_to_separate

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    if not complete:
        print(f"no completed trial ({len(failed)} failed)")
        return
    best = max(complete, key=lambda t: t.value)
    baselines = study.user_attrs.get("baselines", {})
    reference = max(((v["objective"], k) for k, v in baselines.items()), default=(float("nan"), "?"))
    d = decimals_to_separate([best.value, reference[0]], minimum=4)
    delta = best.value - reference[0]
    print(f"{len(complete)} trials complete, {len(failed)} failed; best trial {best.number}: {best.value:.{d}f} "
          f"({delta:+.{decimals_for_differences([delta], minimum=4)}f} vs the best of base and sources, "
          f"{reference[1]}: {reference[0]:.{d}f})")


def _require_complete_trial(study) -> None:
    """A search that completed no trial has no best recipe to report: an error, with the last reason."""
    from optuna.trial import TrialState

    if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    last = f"; last failure: {failed[-1].user_attrs['fail_reason']}" if failed and "fail_reason" in failed[-1].user_attrs else ""
    raise EvomergeError(f"no trial completed ({len(failed)} failed{last}): no best recipe to report")


def cmd_validate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from search.loop import check_config

    config, config_dir = _search_config(args)
    summary = check_config(config, config_dir, rerun=_rerun(args))
    table = Table(title=f"{args.config}: valid", show_header=False)
    for key, value in summary.items():
        shown = "\n".join(f"{k}: {v}" for k, v in value.items()) if isinstance(value, dict) else (
            ", ".join(map(str, value)) if isinstance(value, list) else str(value))
        table.add_row(key, escape(shown))
    Console().print(table)
    return 0


def _add_search_options(p) -> None:
    p.add_argument("config", help="search config YAML (see README: search config reference)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite under results/<name>/)")
    p.add_argument("--study-name", default=None, help="study name (default: the config's name)")
    p.add_argument("--n-trials", type=int, default=None, help="total number of trials in the study")
    p.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--device", default=None, help="cpu or cuda")
    rerun = p.add_mutually_exclusive_group()
    rerun.add_argument("--new-study", action="store_true",
                       help="the study stored here was made with another config: start a new one (the default "
                            "SQLite file is renamed aside, never deleted)")
    rerun.add_argument("--continue-anyway", action="store_true",
                       help="the study stored here was made with another config: continue it with this one "
                            "(the old config is kept in the study; baselines are rescored)")


def _rerun(args: argparse.Namespace) -> str:
    return "new" if args.new_study else "continue" if args.continue_anyway else "check"


def _add_search(sub) -> None:
    p = sub.add_parser("search", help="search merge parameters with Optuna (resumes an existing study)")
    _add_search_options(p)
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_search)
    v = sub.add_parser("validate", help="check a search config (models compatible, tasks exist) without running")
    _add_search_options(v)
    v.set_defaults(func=cmd_validate)


def _add_eval(sub) -> None:
    from evaluators.command import run_eval
    from evaluators.tasks import DEFAULT_INCLUDE_PATH

    p = sub.add_parser("eval", help="score a model directory on lm-eval tasks and/or held-out perplexity")
    p.add_argument("model_dir", help="Hugging Face model directory (config, weights and tokenizer)")
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
    p.add_argument("--perplexity", default=None, metavar="FILE", help="also score perplexity of this text file")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads while scoring (default: torch's; 1 helps on a CPU shared with busy processes)")
    p.add_argument("--output", default=None, help="write the scores (with per-sample values) to this JSON file")
    p.set_defaults(func=run_eval)


def cmd_report(args: argparse.Namespace) -> int:
    from search.report import write_report

    report = write_report(args.run_dir, storage=args.storage, study_name=args.study_name, top_k=args.top_k,
                          test=not args.no_test, merge=args.merge, progress=True)
    print(f"report: {report}")
    print(f"best recipe: {report.parent / 'best_recipe.yaml'}")
    if args.merge:
        print(f"best model: {report.parent / 'best_model'}")
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="best recipe, leaderboard, plots and HTML page of a search (safe while it runs)")
    p.add_argument("run_dir", help="the search's run directory (holds study.db unless --storage is given)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite RUN_DIR/study.db)")
    p.add_argument("--study-name", default=None, help="study name (default: the storage's only study)")
    p.add_argument("--top-k", type=int, default=3,
                   help="leaderboard rows and exported recipes for the N best trials (default: 3)")
    p.add_argument("--merge", action="store_true", help="also merge the best recipe to RUN_DIR/best_model")
    p.add_argument("--no-test", action="store_true", help="skip test-split scoring (search-split columns only)")
    p.set_defaults(func=cmd_report)


@contextmanager
def _no_stray_lock(directory: str | Path):
    """A refused zoo directory keeps no lock file that the refusal itself made."""
    lock = Path(directory) / ".lock"
    existed = lock.exists()
    try:
        yield
    except EvomergeError:
        if not existed:
            lock.unlink(missing_ok=True)
        raise


def cmd_zoo_build(args: argparse.Namespace) -> None:
    from search import zoo

    log = (lambda message: None) if args.quiet else print
    check_writable_dir(args.dir, "zoo directory")
    with _no_stray_lock(args.dir):
        family = zoo.build_zoo(args.dir, log=log)
    print(zoo.summary(family))
    if args.moe_ready:
        for skill, expert in zoo.ensure_moe_ready_experts(family, log).items():
            print(f"moe-ready expert {skill}: {expert['path']} (test split, {skill}: {expert['scores'][skill]:.2f})")


def _add_zoo(sub) -> None:
    from search import zoo

    p = sub.add_parser("zoo", help="the demo model family: a tiny Llama base and one fine-tune per skill")
    actions = p.add_subparsers(dest="zoo_command", required=True, metavar="{build,tasks}")
    build = actions.add_parser("build", help="train the family on CPU in minutes (cached: returns at once when built)")
    build.add_argument("dir", nargs="?", default=str(zoo.DEFAULT_ZOO_DIR),
                       help=f"output directory (default: {zoo.DEFAULT_ZOO_DIR})")
    build.add_argument("--quiet", action="store_true", help="no training log")
    build.add_argument("--moe-ready", action="store_true",
                       help="also fine-tune experts for a mixture of experts (MLPs only, ~1 min) into DIR/moe_ready")
    build.set_defaults(func=cmd_zoo_build)
    tasks = actions.add_parser("tasks", help="regenerate the lm-eval task YAMLs and JSONL splits of the zoo's skills")
    tasks.add_argument("dir", nargs="?", default=str(zoo.TASKS_DIR), help="task directory (default: configs/tasks)")
    tasks.set_defaults(func=cmd_zoo_tasks)


def cmd_zoo_tasks(args: argparse.Namespace) -> None:
    from search import zoo

    check_writable_dir(args.dir, "task directory")
    print(f"wrote {len(zoo.write_tasks(args.dir))} files under {args.dir}")


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the built-in family: build it (cached), search (resumes), report."""
    from pathlib import Path

    from search.config import load_search_config
    from search.loop import search
    from search.report import parse_storage_url, write_report
    from search.zoo import build_zoo

    config_path = Path(args.config)
    root = config_path.resolve().parent.parent
    config = load_search_config(config_path)
    if args.storage is not None:
        parse_storage_url(args.storage)
    zoo_dir = root / "results" / "zoo"
    check_writable_dir(root / "results", "results directory")
    print(f"1/3 demo family in {zoo_dir} (built once, then cached)", flush=True)
    with _no_stray_lock(zoo_dir):
        build_zoo(zoo_dir, log=lambda message: print(f"    {message}", flush=True))
    print(f"2/3 search: {config.n_trials} trials of {config.method} over {len(config.models)} fine-tunes, "
          f"study in {config.storage_url} (running again resumes)", flush=True)
    include = root / config.include_path if config.include_path else None
    config = config.model_copy(update={"output_dir": str(root / config.run_dir), "storage": args.storage,
                                       "include_path": str(include) if include else None})
    study = search(config, config_dir=root, progress=not args.quiet)
    _print_outcome(study)
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


def _add_demo(sub) -> None:
    from pathlib import Path

    default = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    p = sub.add_parser("demo", help="build the demo family, search merges of it and write the report")
    p.add_argument("--config", default=str(default), help=f"search config (default: {default})")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite under results/demo/)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)


SUBCOMMANDS = [_add_merge, _add_search, _add_eval, _add_report, _add_zoo, _add_demo]


class _Parser(argparse.ArgumentParser):
    """A bad flag is reported like any other bad input: one line and exit 2 (the usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="evomerge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    offline_defaults()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except EvomergeError as exc:
        print(f"evomerge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused: a read-only or full disk, a file where a directory goes
        where = ", ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        print(f"evomerge {args.command}: error: {where + ': ' if where else ''}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"evomerge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
