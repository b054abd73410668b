"""The report of a search: the best recipe, a leaderboard with paired-bootstrap CIs, plots, one HTML page.

It only reads the study's storage (never writes to it), so it can be made while a search is running. The
search scores the search split only; test-split scores are computed here by materializing each row into the
loop's live model, and cached in ``RUN_DIR/test_scores.json`` (keyed by row and a hash of what was scored),
so a second report costs nothing and the storage stays the search's alone.

Modules: ``storage`` (reading the study), ``statistics`` (the CIs), ``leaderboard`` (rows, test split,
tables), ``plots``, ``recipes`` (exported YAML, the best model), ``page`` (the HTML).
"""

from __future__ import annotations

from pathlib import Path

from optuna.storages import RDBStorage
from optuna.trial import TrialState

from merge_core.checkpoint import check_writable_dir
from merge_core.errors import EvomergeError
from search.config import default_storage_url
from search.loop import public_url
from search.report.fidelity import fidelity_facts
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
from search.report.plots import (
    layer_profile,
    parameter_importances,
    plot_history,
    plot_importances,
    plot_layer_profile,
    plot_tasks,
)
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
    ranked = completed_trials(study)
    rows = leaderboard_rows(study, ranked, top_k)
    if test:
        score_test_split(rows, config, run_dir, evaluator, progress)

    frame = leaderboard_frame(rows, config)
    shown = display_frame(frame)
    frame.to_csv(run_dir / "leaderboard.csv", index=False)
    leaderboard_md = markdown_table(shown)
    notes = "".join(f"- {note}\n" for note in leaderboard_notes(frame, rows, config))
    (run_dir / "leaderboard.md").write_text(f"# Leaderboard: {study.study_name}\n\n{leaderboard_md}\n{notes}")

    best = ranked[0]
    best_path = export_recipe(best, run_dir / "best_recipe.yaml", storage=storage_url, study=study.study_name)
    export_top_recipes(ranked, run_dir, top_k, storage=storage_url, study=study.study_name)

    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    plots = [plot_history(ranked, study.user_attrs.get("baselines", {}), plots_dir / "history.png"),
             plot_tasks(rows, config, plots_dir / "tasks.png"),
             plot_layer_profile(layer_profile(best.user_attrs["recipe"], config), plots_dir / "layers.png")]
    importances = parameter_importances(study)
    stale = plots_dir / "importances.png"
    if importances:
        plots.append(plot_importances(importances, stale))
    elif stale.exists():
        stale.unlink()

    states = {s: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    facts = {"study": study.study_name, "storage": storage_url, "method": config.method,
             "trials": f"{states[TrialState.COMPLETE]} complete, {states[TrialState.PRUNED]} pruned, "
                       f"{states[TrialState.RUNNING]} running, {states[TrialState.FAIL]} failed",
             "sampler": config.sampler, **fidelity_facts(study, config),
             "best": f"trial {best.number}: {best.value:.6g} (search split)",
             "tasks": ", ".join(f"{t.name} ×{t.weight:g}" for t in config.tasks),
             "evomerge": study.user_attrs.get("evomerge_version", "?")}
    if states[TrialState.RUNNING]:
        facts["note"] = "the search is still running: this report is a snapshot"
    report = write_html(run_dir / "report.html", title=f"evomerge report: {study.study_name}", facts=facts,
                        table=shown, plots=plots, recipe_text=best_path.read_text(),
                        notes=leaderboard_notes(frame, rows, config))
    if merge:
        write_best_model(best_path, run_dir / "best_model", leaderboard_md)
    return report

