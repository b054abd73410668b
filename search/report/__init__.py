"""The report of a search: the best recipe, a leaderboard with paired-bootstrap CIs, plots, one HTML page.

It only reads the study's storage (never writes to it), so it can be made while a search is running. The
search scores the search split only; test-split scores are computed here by materializing each row into the
loop's live model, and cached in ``RUN_DIR/test_scores.json`` (keyed by row and a hash of what was scored),
so a second report costs nothing and the storage stays the search's alone.

Modules: ``storage`` (reading the study), ``statistics`` (the CIs), ``leaderboard`` (rows, test split,
tables), ``pareto`` (feasibility, the front, the rule that picks the best), ``constraints`` (their test-split
check), ``rationale`` (method lists), ``inventory`` (the sources), ``plots``, ``recipes`` (exported YAML, the
best model), ``page`` (the HTML).
"""

from __future__ import annotations

from pathlib import Path

from optuna.storages import RDBStorage
from optuna.trial import TrialState

from merge_core.checkpoint import check_writable_dir
from merge_core.errors import EvomergeError
from search.config import default_storage_url
from search.loop import public_url, rank_value
from search.objectives import describe_objective
from search.report.constraints import constraint_check
from search.report.fidelity import fidelity_facts
from search.report.inventory import source_inventory
from search.report.leaderboard import (
    TEST_CACHE,
    Row,
    display_frame,
    leaderboard_frame,
    leaderboard_notes,
    leaderboard_rows,
    markdown_table,
    score_test_split,
)
from search.report.page import write_html
from search.report.pareto import choose_best, export_pareto_recipes, pareto_frame
from search.report.plots import (
    layer_profile,
    parameter_importances,
    plot_history,
    plot_importances,
    plot_layer_profile,
    plot_pareto,
    plot_tasks,
)
from search.report.rationale import method_rationale
from search.report.recipes import export_recipe, export_top_recipes, write_best_model
from search.report.statistics import paired_bootstrap
from search.report.storage import (
    close_storage,
    completed_trials,
    load_evomerge_study,
    open_storage_read_only,
    parse_storage_url,
    sqlite_file,
    study_config,
)

__all__ = ["TEST_CACHE", "Row", "display_frame", "layer_profile", "leaderboard_frame", "paired_bootstrap",
           "parse_storage_url", "write_report"]


def write_report(run_dir: str | Path, *, storage: str | None = None, study_name: str | None = None, top_k: int = 3,
                 test: bool = True, merge: bool = False, evaluator=None, progress: bool = False) -> Path:
    """Write the run's report into ``run_dir``; returns the path of ``report.html``.

    ``evaluator`` replaces the test-split lm-eval evaluator (tests inject a cheap one, as ``search`` allows).
    """
    if top_k < 1:
        raise EvomergeError(f"--top-k must be at least 1, got {top_k}")
    run_dir = Path(run_dir)
    storage = storage or default_storage_url(run_dir)
    db_file = sqlite_file(storage)
    if db_file is None or db_file.is_file():  # else there is no study here, which is said first
        check_writable_dir(run_dir, "run directory")  # SQLite too: a WAL database writes its -shm file there
    rdb = open_storage_read_only(run_dir, storage)
    try:
        return _write_report(run_dir, rdb, storage, study_name, top_k, test, merge, evaluator, progress)
    finally:
        close_storage(rdb)


def _write_report(run_dir: Path, rdb: RDBStorage, storage: str, study_name: str | None, top_k: int, test: bool,
                  merge: bool, evaluator, progress: bool) -> Path:
    study = load_evomerge_study(rdb, storage, study_name)
    run_dir.mkdir(parents=True, exist_ok=True)  # a study in a server database may have no run directory yet
    storage_url = public_url(storage)
    config = study_config(study)
    ranked, front, rule = choose_best(completed_trials(study), config)
    rows = leaderboard_rows(study, ranked, top_k, config)
    if test:
        score_test_split(rows, config, run_dir, evaluator, progress)

    frame = leaderboard_frame(rows, config)
    shown = display_frame(frame)
    frame.to_csv(run_dir / "leaderboard.csv", index=False)
    leaderboard_md = markdown_table(shown)
    best = ranked[0]
    sections = _sections(study, ranked, front, rows, config, run_dir, storage_url, rule)
    notes = "".join(f"- {note}\n" for note in leaderboard_notes(frame, rows, config))
    extra = "".join(f"\n## {name}\n\n{markdown_table(table)}" + (f"\n{text}\n" if text else "")
                    for name, table, text in sections)
    (run_dir / "leaderboard.md").write_text(f"# Leaderboard: {study.study_name}\n\n{leaderboard_md}\n{notes}{extra}")

    best_path = export_recipe(best, run_dir / "best_recipe.yaml", storage=storage_url, study=study.study_name)
    export_top_recipes(ranked, run_dir, top_k, storage=storage_url, study=study.study_name)

    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    plots = [plot_history(ranked, study.user_attrs.get("baselines", {}), plots_dir / "history.png"),
             plot_tasks(rows, config, plots_dir / "tasks.png"),
             plot_layer_profile(layer_profile(best.user_attrs["recipe"], config), plots_dir / "layers.png")]
    stale_pareto = plots_dir / "pareto.png"
    if config.multi_objective:
        plots.append(plot_pareto(ranked, front, best, config, study.user_attrs.get("baselines", {}), stale_pareto))
    elif stale_pareto.exists():
        stale_pareto.unlink()
    importances = parameter_importances(study)
    stale = plots_dir / "importances.png"
    if importances:
        plots.append(plot_importances(importances, stale))
    elif stale.exists():
        stale.unlink()

    states = {s: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    facts = {"study": study.study_name, "storage": storage_url, "method": ", ".join(config.methods),
             "trials": f"{states[TrialState.COMPLETE]} complete, {states[TrialState.PRUNED]} pruned, "
                       f"{states[TrialState.RUNNING]} running, {states[TrialState.FAIL]} failed",
             "sampler": config.sampler_name, **fidelity_facts(study, config),
             "best": f"trial {best.number}: {rank_value(best):.6g} (search split)"
                     + (f", objectives {', '.join(f'{v:.4g}' for v in best.values)}" if config.multi_objective else "")
                     + f"; {_metrics_text(best_scores(rows, best), config)}",
             "objective": describe_objective(config), "choice": rule,
             "tasks": ", ".join(f"{t.name} ×{t.weight:g}" for t in config.tasks),
             "evomerge": study.user_attrs.get("evomerge_version", "?")}
    if config.constraints:
        facts["constraints"] = "; ".join(b.label for b in _bounds(rows, config))
    if states[TrialState.RUNNING]:
        facts["note"] = "the search is still running: this report is a snapshot"
    report = write_html(run_dir / "report.html", title=f"evomerge report: {study.study_name}", facts=facts,
                        table=shown, plots=plots, recipe_text=best_path.read_text(),
                        notes=leaderboard_notes(frame, rows, config), sections=sections)
    if merge:
        write_best_model(best_path, run_dir / "best_model", leaderboard_md)
    return report


def best_scores(rows: list[Row], best):
    return next(r.search for r in rows if r.trial is not None and r.trial.number == best.number)


def _metrics_text(scores, config) -> str:
    """Each task's metric itself (perplexities and bits per byte as they are, not as the objective takes them)."""
    from search.objectives import task_metric

    return ", ".join(f"{task} {(m := task_metric(config, scores, task))} {scores.value(task, m):.4g}"
                     for task in config.scored_tasks if task in scores.tasks)


def _bounds(rows: list[Row], config):
    from search.report.leaderboard import split_objective

    return split_objective(rows, config, "search").bounds(rows[0].search)


def _sections(study, ranked, front, rows: list[Row], config, run_dir: Path, storage_url: str, rule: str):
    """The report's sections after the leaderboard: (title, table, text)."""
    sections = []
    best_row = next(r for r in rows if r.trial is not None and r.trial.number == ranked[0].number)
    if config.constraints and best_row.test is not None:
        sections.append(("Constraints on the test split (best recipe)", constraint_check(best_row, rows, config),
                         "margin: how far the value is on the good side of its bound, in the metric's units "
                         "(negative: violated). CI: paired bootstrap 95% over the test documents, the reference "
                         "model's documents resampled with the recipe's. " + rule))
    if config.multi_objective:
        export_pareto_recipes(front, run_dir, storage=storage_url, study=study.study_name)
        sections.append((f"Pareto front ({len(front)} trials, search split)", pareto_frame(front, config, ranked[0]),
                         rule + ". Every Pareto trial's recipe is under recipes/pareto/."))
    if len(config.methods) > 1:
        table, text = method_rationale(study, ranked, rows, config)
        sections.append(("Method rationale", table, text))
    if config.routing_only:
        sections.append(("Layer path of the best recipe", layer_path_frame(ranked[0].user_attrs["recipe"]),
                         "Each row a run of consecutive layers of one model and one scale (on what the layers "
                         "add to the residual stream); top to bottom is input to output."))
    sections += stage_sections(study, config, run_dir)
    sections.append(("Source models", source_inventory(rows, study.user_attrs.get("baselines", {}), config),
                     "score: what ranks trials (see the objective above) on each split; weights sha256: the first "
                     "16 hex digits of a SHA-256 over the weight files, recorded when the search scored them."))
    return [(title, _rounded(table), text) for title, table, text in sections]


def layer_path_frame(recipe):
    import pandas as pd

    from merge_core.routing import path_of_recipe, runs

    def span(first: int, count: int) -> str:
        return f"{first}–{first + count - 1}" if count > 1 else str(first)

    rows, at = [], 0
    for model, start, end, scale in runs(path_of_recipe(recipe)):
        rows.append({"slots": span(at, end - start), "model": Path(model).name, "layers": span(start, end - start),
                     "scale": scale})
        at += end - start
    return pd.DataFrame(rows)


def stage_sections(study, config, run_dir: Path) -> list[tuple[str, object, str]]:
    """PS + DFS: each stage's report shows the other stage's leaderboard (as that stage's report last wrote it)."""
    import pandas as pd

    from search.routing import STAGE_DIR
    from search.stages import STAGE1_KEY

    stage1 = study.user_attrs.get(STAGE1_KEY)
    if stage1 is not None:
        other, title = Path(stage1["run_dir"]), f"Stage 1: parameter search (study {stage1['study']!r})"
        text = (f"This layer-path search started from trial {stage1['trial']} of the parameter search, whose merge "
                f"is the source {Path(stage1['merge']).name} here ({stage1['merge']}); its report: "
                f"{other / 'report.html'}.")
    elif config.routing is not None and not config.routing_only:
        other, title = run_dir / STAGE_DIR, "Stage 2: layer paths through the best merge"
        text = f"The layer-path search after this one; its report: {other / 'report.html'}."
    else:
        return []
    board = other / "leaderboard.csv"
    if not board.is_file():
        return [(title, pd.DataFrame({"": ["not run yet"]}), text)]
    return [(title, display_frame(pd.read_csv(board)), text)]


def _rounded(frame):
    """Numbers shown with 4 decimals (the CSV-like precision of floats is noise in a table to read)."""
    return frame.map(lambda v: f"{v:.4f}" if isinstance(v, float) and v == v else ("" if isinstance(v, float) else v))
