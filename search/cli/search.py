"""`evomerge search` and `evomerge validate`: run or check a search config."""

from __future__ import annotations

import argparse

from merge_core.errors import EvomergeError


def _search_config(args: argparse.Namespace):
    """The config with the flags applied, read as a mergekit-evolve config when asked or when it has a
    ``genome:`` key; with ``--print-config`` it is printed as an evomerge search config (None returned)."""
    import sys
    from pathlib import Path

    import yaml

    from merge_core.recipe import read_yaml_mapping
    from search.config import FLAG_FIELDS, load_search_config, with_overrides
    from search.mergekit_evolve import is_mergekit_evolve, load_as_search_config

    what = "mergekit-evolve config" if args.from_mergekit_evolve else "search config"
    data = read_yaml_mapping(args.config, what)
    if args.from_mergekit_evolve or is_mergekit_evolve(data):
        config, conversion = load_as_search_config(args.config)
        data = conversion.config
        for warning in conversion.warnings:
            print(f"warning: {args.config}: {warning}", file=sys.stderr)
    else:
        config = load_search_config(args.config)
    flags = {"--storage": args.storage, "--n-trials": args.n_trials, "--timeout": args.timeout,
             "--max-items": args.max_items, "--device": args.device, "--study-name": args.study_name}
    config = with_overrides(config, flags)
    if args.print_config:
        overrides = {FLAG_FIELDS[flag]: value for flag, value in flags.items() if value is not None}
        print(yaml.safe_dump({**data, **overrides}, sort_keys=False), end="")
        return None, None
    return config, Path(args.config).parent


def cmd_search(args: argparse.Namespace) -> int:
    from search.stages import run_stages

    config, config_dir = _search_config(args)
    if config is None:
        return 0
    stages = run_stages(config, config_dir=config_dir, progress=not args.quiet, rerun=_rerun(args))
    for stage, study in stages:
        if len(stages) > 1:
            print(f"{study.study_name}: ", end="")
        print_outcome(study)
        _require_complete_trial(study)
    if not args.no_report:
        from search.report import write_report

        # the parameter search's report again last: it shows the layer-path stage's leaderboard too
        for stage, _ in stages + stages[:-1]:
            write_report(stage.run_dir, storage=stage.storage_url, study_name=stage.study,
                         progress=not args.quiet)
        for stage, _ in stages:
            print(f"report: {stage.run_dir / 'report.html'}")
    return 0


def print_outcome(study) -> None:
    from optuna.trial import TrialState

    from search.formatting import decimals_for_differences, decimals_to_separate
    from search.loop import rank_key, rank_value

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    if not complete:
        print(f"no completed trial ({len(failed)} failed)")
        return
    from search.config import SearchConfig
    from search.report.pareto import choose_best

    config = SearchConfig.model_validate(study.user_attrs["config"])
    feasible = [t for t in complete if t.user_attrs.get("feasible", True)]
    best = choose_best(sorted(complete, key=rank_key), config)[0][0]
    value = rank_value(best)
    baselines = study.user_attrs.get("baselines", {})
    reference = max(((v["objective"], k) for k, v in baselines.items()), default=(float("nan"), "?"))
    d = decimals_to_separate([value, reference[0]], minimum=4)
    delta = value - reference[0]
    what = "average" if len(best.values) > 1 else "objective"
    constrained = f", {len(feasible) or 'none'} feasible" if config.constraints else ""
    print(f"{len(complete)} trials complete{constrained}, {len(failed)} failed; best trial {best.number}: "
          f"{what} {value:.{d}f} "
          f"({delta:+.{decimals_for_differences([delta], minimum=4)}f} vs the best of base and sources, "
          f"{reference[1]}: {reference[0]:.{d}f})")


def _require_complete_trial(study) -> None:
    """A search that completed no trial has no best recipe to report: an error, with the last reason."""
    from optuna.trial import TrialState

    if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    reason = failed[-1].user_attrs.get("fail_reason") if failed else None
    last = f"; last failure: {reason}" if reason is not None else ""
    raise EvomergeError(f"no trial completed ({len(failed)} failed{last}): no best recipe to report")


def cmd_validate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from search.loop import check_config

    config, config_dir = _search_config(args)
    if config is None:
        return 0
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
    p.add_argument("--from-mergekit-evolve", action="store_true",
                   help="CONFIG is a mergekit-evolve config (genome + tasks); a config with a genome: key is "
                        "read as one without this flag too")
    p.add_argument("--print-config", action="store_true",
                   help="print the config as an evomerge search config (converted, flags applied) and stop")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite under results/<name>/)")
    p.add_argument("--study-name", default=None, help="study name (default: the config's name)")
    p.add_argument("--n-trials", type=int, default=None, help="total number of trials in the study")
    p.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--max-items", type=int, default=None,
                   help="stop after this many item-evaluations (documents scored, all tasks and trials)")
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


def add(sub) -> None:
    p = sub.add_parser("search", help="search merge parameters with Optuna (resumes an existing study)")
    _add_search_options(p)
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_search)
    v = sub.add_parser("validate", help="check a search config (models compatible, tasks exist) without running")
    _add_search_options(v)
    v.set_defaults(func=cmd_validate)
