"""The report of a search: the best recipe, a leaderboard with paired-bootstrap CIs, plots, one HTML page.

It only reads the study's storage (never writes to it), so it can be made while a search is running. The
search scores the search split only; test-split scores are computed here by materializing each row into the
loop's live model, and cached in ``RUN_DIR/test_scores.json`` (keyed by row and a hash of what was scored),
so a second report costs nothing and the storage stays the search's alone.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import html
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from evaluators.base import PROBABILITY_FORMS, Scores, comparable_value, corpus_probability
from merge_core.architecture import parse_layer
from merge_core.checkpoint import check_writable_dir, resolve_model_path
from merge_core.engine import merge as merge_to_disk
from merge_core.engine import open_sources
from merge_core.errors import EvomergeError
from merge_core.plan import plan_merge
from merge_core.recipe import Provenance, load_recipe, model_card, validate
from search.config import SearchConfig
from search.formatting import decimals_for_differences, decimals_to_separate
from search.loop import objective_of, open_workbench
from search.loop import public_url as _public_url
from search.preflight import build_evaluator
from search.space import model_labels

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
MIN_TRIALS_FOR_IMPORTANCE = 10
MAX_IMPORTANCES_SHOWN = 20
TEST_CACHE = "test_scores.json"
SPLITS = ("search", "test")
SQLITE_HEADER = b"SQLite format 3\x00"


@dataclass
class Row:
    """One leaderboard row: a model the search started from, or a trial's recipe."""

    name: str
    role: str
    search: Scores
    model: str | None = None  # source and base rows: the checkpoint the search read
    trial: FrozenTrial | None = None  # trial rows
    test: Scores | None = None

    @property
    def recipe(self) -> dict[str, Any] | None:
        return self.trial.user_attrs["recipe"] if self.trial else None


# --- reading the study --------------------------------------------------------------------------------

def parse_storage_url(url: str):
    """The storage URL parsed (SQLAlchemy's ``URL``), or a one-line error for one that is not a URL at all."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError, TypeError):
        raise EvomergeError(f"storage {url!r}: not a database URL (e.g. sqlite:///path/study.db or "
                            f"postgresql://user@host/db)") from None


def _sqlite_file(url: str) -> Path | None:
    parsed = parse_storage_url(url)
    return Path(parsed.database) if parsed.drivername.startswith("sqlite") and parsed.database else None


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain: Optuna wraps a driver's refusal ("file is not a database") in a
    generic commit error that names no cause."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    return exc


def _close(rdb: RDBStorage | None) -> None:
    """Close the storage's connections: SQLite then removes its -wal/-shm files, leaving the run dir as it was."""
    if rdb is not None:
        rdb.remove_session()
        rdb.engine.dispose()


def default_storage(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'study.db').as_posix()}"


def open_study(run_dir: Path, storage: str, study_name: str | None = None) -> optuna.Study:
    """The run's study, opened read-only: no table creation, no heartbeat, no stale-trial handling."""
    rdb = open_storage_read_only(run_dir, storage)
    try:
        return load_evomerge_study(rdb, storage, study_name)
    except EvomergeError:
        _close(rdb)
        raise


def open_storage_read_only(run_dir: Path, storage: str) -> RDBStorage:
    """The storage, without creating tables (or, for SQLite, a database file where there was none)."""
    shown = _public_url(storage)
    db_file = _sqlite_file(storage)
    if db_file is not None and not db_file.is_file():  # SQLAlchemy would create an empty database
        raise EvomergeError(f"{run_dir}: no study here ({db_file} does not exist; give --storage)")
    if db_file is not None:  # refused before SQLite opens it, which would turn it into a WAL database
        with open(db_file, "rb") as handle:
            head = handle.read(len(SQLITE_HEADER))
        if head != SQLITE_HEADER:
            raise EvomergeError(f"{run_dir}: no study here ({db_file} is "
                                f"{'empty' if not head else 'not an SQLite database'})")
    rdb = None
    try:
        rdb = RDBStorage(storage, skip_table_creation=True)
        rdb.get_all_studies()
    except Exception as exc:
        _close(rdb)
        cause = _root_cause(exc)
        raise EvomergeError(f"storage {shown}: {type(cause).__name__}: "
                            f"{(str(cause).splitlines() or [''])[0]}") from None
    return rdb


def load_evomerge_study(rdb: RDBStorage, storage: str, study_name: str | None) -> optuna.Study:
    """The study ``study_name`` (default: the storage's only one), refused unless ``evomerge search`` made it."""
    shown = _public_url(storage)
    names = [s.study_name for s in rdb.get_all_studies()]
    if not names:
        raise EvomergeError(f"storage {shown} holds no study")
    if study_name is None:
        if len(names) > 1:
            raise EvomergeError(f"storage {shown} holds several studies ({', '.join(names)}): give --study-name")
        study_name = names[0]
    elif study_name not in names:
        raise EvomergeError(f"storage {shown} has no study {study_name!r} (it has: {', '.join(names)})")
    study = optuna.load_study(study_name=study_name, storage=rdb)
    if "config" not in study.user_attrs:
        raise EvomergeError(f"study {study_name!r} was not made by evomerge search (it has no config)")
    return study


def study_config(study: optuna.Study) -> SearchConfig:
    """The search config with model refs replaced by the paths the search read (recorded with the baselines):
    refs may be relative to a config file the report does not know, and trial recipes name these paths."""
    config = validate(SearchConfig, study.user_attrs["config"], f"study {study.study_name!r}: stored config")
    baselines = study.user_attrs.get("baselines", {})
    labels = model_labels([config.base_model, *config.models])
    path = {ref: baselines[label]["model"] if label in baselines else str(resolve_model_path(ref))
            for ref, label in labels.items()}
    return config.model_copy(update={"base_model": path[config.base_model],
                                     "models": [path[m] for m in config.models]})


def completed_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Completed trials, best first (ties: earliest first)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
                  for s in (TrialState.RUNNING, TrialState.FAIL)}
        raise EvomergeError(f"study {study.study_name!r} has no completed trial yet "
                            f"({counts['running']} running, {counts['fail']} failed)")
    return sorted(complete, key=lambda t: (-t.value, t.number))


def leaderboard_rows(study: optuna.Study, ranked: list[FrozenTrial], top_k: int) -> list[Row]:
    """Base, sources, the hand-written first trial, then the best and the rest of the top-k trials."""
    baselines = study.user_attrs.get("baselines", {})
    models = sorted(baselines.items(), key=lambda item: not item[1]["is_base"])
    rows = [Row(label, "base" if b["is_base"] else "source", Scores.from_dict(b["scores"]), model=b["model"])
            for label, b in models]
    roles: dict[int, list[str]] = {}
    handwritten = next((t for t in sorted(ranked, key=lambda t: t.number) if t.user_attrs.get("handwritten")), None)
    if handwritten is not None:
        roles[handwritten.number] = ["hand-written"]
    for rank, trial in enumerate(ranked[:top_k], start=1):
        roles.setdefault(trial.number, []).append("best" if rank == 1 else f"top {rank}")
    by_number = {t.number: t for t in ranked}
    order = ([handwritten.number] if handwritten else []) + [t.number for t in ranked[:top_k]]
    for number in dict.fromkeys(order):
        trial = by_number[number]
        rows.append(Row(f"trial {number}", ", ".join(roles[number]), Scores.from_dict(trial.user_attrs["scores"]),
                        trial=trial))
    return rows


# --- statistics ---------------------------------------------------------------------------------------

def _task_metrics(config: SearchConfig, scores: Scores) -> list[tuple[str, str, float]]:
    """(task, metric, weight) of the objective, the metric defaulting to the task's primary one."""
    return [(t.name, t.metric or scores.tasks[t.name].primary_metric, t.weight) for t in config.tasks]


def _resampled(task: Any, metric: str, idx: np.ndarray) -> np.ndarray | None:
    """Each resample's task value in the objective's (higher-is-better) form: the mean of per-document
    values, or for a corpus-level metric the ratio of sums recomputed (``corpus_probability``). None when
    the metric has no per-document form to resample."""
    x = np.asarray(task.samples.get(metric, []), dtype=float)
    if metric in task.counts:
        return corpus_probability(x[idx], np.asarray(task.counts[metric], dtype=float)[idx], axis=1)
    if task.higher_is_better.get(metric, True):
        return x[idx].mean(axis=1)
    return None


def ci_method(scores: Scores, task: str, metric: str) -> str:
    """How the leaderboard's CI treats this task's metric, in words (shown under the table)."""
    score = scores.tasks[task]
    if not score.samples.get(metric):
        return "no CI: the evaluator kept no per-document values"
    if metric in score.counts:
        return ("documents resampled, the corpus-level value recomputed as a ratio of sums "
                "(exp(Σ log-likelihood / Σ units))")
    if score.higher_is_better.get(metric, True):
        return "documents resampled, the mean of per-document values recomputed"
    return "no CI: lower-is-better per-document values with no corpus-level form"


def paired_bootstrap(a: Scores, b: Scores, config: SearchConfig, *, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% CI of objective(a) − objective(b): documents are resampled with the same indices for both models
    (per task), so the CI reflects how the two differ on the same items, not the items' own spread. Each
    resample's task value is what the objective takes: a mean of per-document values, or a corpus-level
    metric recomputed from the resampled documents' sums (e.g. 1/byte_perplexity = exp(Σ ll / Σ bytes)).
    NaN when a task lacks per-document values or the two were scored on different documents."""
    rng = np.random.default_rng(seed)
    total = sum(t.weight for t in config.tasks)
    diff = np.zeros(resamples)
    for task, metric, weight in _task_metrics(config, a):
        ta, tb = a.tasks[task], b.tasks[task]
        size = len(ta.samples.get(metric, []))
        if size == 0 or size != len(tb.samples.get(metric, [])):
            return math.nan, math.nan
        idx = rng.integers(0, size, size=(resamples, size))
        va, vb = _resampled(ta, metric, idx), _resampled(tb, metric, idx)
        if va is None or vb is None:
            return math.nan, math.nan
        diff += weight / total * (va - vb)
    low, high = np.percentile(diff, [2.5, 97.5])
    return float(low), float(high)


# --- test split ---------------------------------------------------------------------------------------

def _test_key(row: Row, config: SearchConfig) -> str:
    """Row name + hash of what was scored and how, so a changed recipe or task setting is scored anew."""
    scored = row.recipe if row.recipe is not None else {"model": row.model}
    settings = config.model_dump(include={"tasks", "include_path", "limit", "num_fewshot", "dtype", "seed"})
    digest = hashlib.sha256(json.dumps([scored, settings], sort_keys=True, default=str).encode()).hexdigest()
    return f"{row.name}@{digest[:16]}"


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def score_test_split(rows: list[Row], config: SearchConfig, run_dir: Path, evaluator=None,
                     progress: bool = False) -> None:
    """Fill ``row.test`` for every row: from the cache, else by loading the row into the loop's workbench."""
    cache_path = run_dir / TEST_CACHE
    cache = _read_test_cache(cache_path)
    missing = [row for row in rows if _test_key(row, config) not in cache]
    if missing:
        from rich.console import Console

        console = Console(stderr=True, quiet=not progress)
        with console.status("test split: loading models and tasks"):
            bench = open_workbench(config, evaluator=evaluator or build_evaluator(config, split="test"))
        for i, row in enumerate(missing, start=1):
            with console.status(f"test split: scoring {row.name} ({i}/{len(missing)})"):
                if row.recipe is None:
                    bench.load_source(row.model)
                else:
                    bench.materialize(row.recipe)
                cache[_test_key(row, config)] = bench.evaluator.score(bench.model, bench.tokenizer).to_dict()
            _write_json(cache_path, cache)  # an interrupted report keeps what it has scored
    for row in rows:
        try:
            row.test = Scores.from_dict(cache[_test_key(row, config)])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise EvomergeError(f"{cache_path}: the entry of {row.name} is not a set of scores "
                                f"(delete the file to score the test split again)") from None


def _read_test_cache(path: Path) -> dict[str, Any]:
    """The cached test-split scores; a cache that is not ours to read is refused, never silently replaced."""
    if not path.exists():
        return {}
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EvomergeError(f"{path}: cannot be read ({exc.strerror})") from None
    except ValueError:
        raise EvomergeError(f"{path}: not valid JSON (delete the file to score the test split again)") from None
    if not isinstance(cache, dict):
        raise EvomergeError(f"{path}: expected a JSON object of test-split scores "
                            f"(delete the file to score the test split again)")
    return cache


# --- tables -------------------------------------------------------------------------------------------

def reference_row(rows: list[Row], config: SearchConfig) -> Row | None:
    """What a merge must beat: the best of the base and the sources on the search split."""
    starts = [r for r in rows if r.role in ("base", "source")]
    return max(starts, key=lambda r: objective_of(r.search, config), default=None)


def _probability(scores: Scores, task: str, metric: str) -> float | None:
    return comparable_value(scores, task, metric) if metric.split(",")[0] in PROBABILITY_FORMS else None


def perplexity_flags(rows: list[Row], config: SearchConfig, split: str) -> dict[str, str]:
    """Rows whose perplexity on a task exceeds 2× the best (lowest) of the base and the sources: a broken
    language model, whatever its average says. bits_per_byte counts through its perplexity, 2^bits_per_byte."""
    starts = [r for r in rows if r.role in ("base", "source")]
    flags: dict[str, list[str]] = {}
    for task, metric, _ in _task_metrics(config, starts[0].search) if starts else []:
        best = max((_probability(getattr(r, split), task, metric) or 0.0 for r in starts), default=0.0)
        for row in rows:
            value = _probability(getattr(row, split), task, metric)
            if value is not None and value < best / 2:
                flags.setdefault(row.name, []).append(f"{task} perplexity > 2× best source ({split})")
    return {name: "; ".join(found) for name, found in flags.items()}


def leaderboard_frame(rows: list[Row], config: SearchConfig) -> pd.DataFrame:
    """One row per leaderboard row; per split: each task's metric, the objective, and its difference to the
    best of the base and the sources (chosen on the search split; ``frame.attrs["reference"]`` names it) with
    a paired bootstrap 95% CI. Rows that break a perplexity get a ``flag``."""
    reference = reference_row(rows, config)
    splits = [s for s in SPLITS if all(getattr(r, s) is not None for r in rows)]
    flags: dict[str, str] = {}
    for split in splits:
        for name, flag in perplexity_flags(rows, config, split).items():
            flags[name] = "; ".join(filter(None, [flags.get(name), flag]))
    records = []
    for row in rows:
        record: dict[str, Any] = {"model": row.name, "role": row.role,
                                  "trial": row.trial.number if row.trial else None}
        for split in splits:
            scores: Scores = getattr(row, split)
            for task, metric, _ in _task_metrics(config, scores):
                record[f"{task} {metric} ({split})"] = scores.value(task, metric)
            record[f"average ({split})"] = objective_of(scores, config)
            if reference is not None:
                ref_scores = getattr(reference, split)
                low, high = paired_bootstrap(scores, ref_scores, config)
                delta = objective_of(scores, config) - objective_of(ref_scores, config)
                record[f"Δ vs {reference.name} ({split})"] = delta
                record[f"Δ CI low ({split})"], record[f"Δ CI high ({split})"] = low, high
        if flags:
            record["flag"] = flags.get(row.name, "")
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    frame.attrs["reference"] = f"{reference.name} ({reference.role})" if reference is not None else None
    return frame


def display_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as text: per column, enough decimals (at least 3) to tell its rows apart, each
    difference with two significant digits and its CI in one cell ("no CI" where none can be computed)."""
    shown = pd.DataFrame({"model": frame["model"], "role": frame["role"]})
    for column in frame.columns[3:]:
        if column.startswith("Δ CI "):
            continue
        if column == "flag":
            shown[column] = frame[column]
        elif column.startswith("Δ vs "):
            split = column.rsplit("(", 1)[1]
            low, high = frame[f"Δ CI low ({split}"], frame[f"Δ CI high ({split}"]
            d = decimals_for_differences(frame[column])
            shown[column + " [95% CI]"] = [
                f"{v:+.{d}f}" + (" (no CI)" if math.isnan(lo) else f" [{lo:+.{d}f}, {hi:+.{d}f}]")
                for v, lo, hi in zip(frame[column], low, high)]
        else:
            d = decimals_to_separate(frame[column])
            shown[column] = [f"{v:.{d}f}" for v in frame[column]]
    return shown


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' ``to_markdown`` needs ``tabulate``, which evomerge does not require)."""
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, frame.columns)) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(frame.columns))) + "|"]
    lines += ["| " + " | ".join(map(cell, values)) + " |" for values in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# --- recipes ------------------------------------------------------------------------------------------

def export_recipe(trial: FrozenTrial, path: Path, *, storage: str, study: str, rank: int = 1) -> Path:
    """The trial's recipe as a self-contained YAML file: provenance in the ``evomerge:`` block (whose seed
    ``evomerge merge`` uses; mergekit ignores the block) and a comment header for people."""
    data = copy.deepcopy(trial.user_attrs["recipe"])
    stored = data.get("evomerge") or {}
    data["evomerge"] = Provenance(version=stored.get("version"), seed=stored.get("seed"), storage=storage,
                                  study=study, trial=trial.number, objective=trial.value).model_dump(exclude_none=True)
    recipe = load_recipe(data)
    header = (f"# evomerge recipe #{rank} of study {study!r}: trial {trial.number}, "
              f"objective {trial.value:.6g} on the search split\n"
              f"# Reproduce the evaluated weights: evomerge merge {path.name} OUT_DIR "
              f"(mergekit also accepts this file)\n")
    path.write_text(header + recipe.to_yaml())
    return path


def export_top_recipes(ranked: list[FrozenTrial], run_dir: Path, top_k: int, *, storage: str, study: str) -> None:
    """``recipes/rank<N>_trial<M>.yaml`` for the top k; files of an earlier report are replaced."""
    out = run_dir / "recipes"
    out.mkdir(exist_ok=True)
    for old in out.glob("rank*_trial*.yaml"):
        old.unlink()
    for rank, trial in enumerate(ranked[:top_k], start=1):
        export_recipe(trial, out / f"rank{rank}_trial{trial.number}.yaml", storage=storage, study=study, rank=rank)


# --- plots --------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_history(ranked: list[FrozenTrial], baselines: dict[str, Any], path: Path) -> Path:
    """Each trial's objective, the best so far, and each source model's score as the line to beat."""
    plt = _pyplot()
    trials = sorted(ranked, key=lambda t: t.number)
    numbers = [t.number for t in trials]
    values = np.array([t.value for t in trials])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.scatter(numbers, values, s=16, alpha=0.6, label="trial")
    ax.step(numbers, np.maximum.accumulate(values), where="post", color="black", label="best so far")
    for i, (label, b) in enumerate(baselines.items()):
        ax.axhline(b["objective"], linestyle="--", linewidth=1, color=f"C{i + 1}",
                   label=f"{label} ({'base' if b['is_base'] else 'source'})")
    ax.set(xlabel="trial", ylabel="objective (search split)", title="Optimization history")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_tasks(rows: list[Row], config: SearchConfig, path: Path) -> Path:
    """Per task, grouped bars of the base, each source and the best trial, on each split scored."""
    plt = _pyplot()
    shown = [r for r in rows if r.role in ("base", "source") or "best" in r.role.split(", ")]
    splits = [s for s in SPLITS if all(getattr(r, s) is not None for r in shown)]
    fig, axes = plt.subplots(1, len(splits), figsize=(4 + 2.5 * len(config.tasks) * len(splits), 4.5), squeeze=False)
    width = 0.8 / len(shown)
    for ax, split in zip(axes[0], splits):
        tasks = _task_metrics(config, getattr(shown[0], split))
        for i, row in enumerate(shown):
            values = [getattr(row, split).value(task, metric) for task, metric, _ in tasks]
            ax.bar(np.arange(len(tasks)) + (i - (len(shown) - 1) / 2) * width, values, width,
                   label=f"{row.name} ({row.role})")
        ax.set_xticks(np.arange(len(tasks)), [f"{task}\n{metric}" for task, metric, _ in tasks])
        ax.set_title(f"{split} split")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=len(shown), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    return _save(fig, path)


def layer_profile(recipe_dict: dict[str, Any], config: SearchConfig) -> pd.DataFrame:
    """Mean/min/max of each searched parameter per (parameter, model, layer), as the merge resolves them per
    tensor (filters and gradients included), from the plan: only names and shapes are read."""
    recipe = load_recipe(recipe_dict)
    labels = model_labels(config.models)
    jobs = plan_merge(recipe, open_sources(recipe)).jobs
    records = []
    for job in jobs:
        layer = parse_layer(job.name)
        if layer is None:
            continue
        per_model = [(labels[m], p) for m, p in zip(job.models, job.model_params) if m in labels]
        for owner, params in [*per_model, ("all models", job.params)]:
            records += [(name, owner, layer.index, float(value)) for name, value in params.items()
                        if name in config.parameters and isinstance(value, (int, float))
                        and not isinstance(value, bool)]
    frame = pd.DataFrame.from_records(records, columns=["parameter", "model", "layer", "value"])
    return frame.groupby(["parameter", "model", "layer"])["value"].agg(["mean", "min", "max"]).reset_index()


def plot_layer_profile(profile: pd.DataFrame, path: Path) -> Path:
    """One panel per parameter: its value by layer, one line per model (band: spread over the layer's tensors)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    params = list(dict.fromkeys(profile["parameter"]))
    fig, axes = plt.subplots(1, max(len(params), 1), figsize=(4.5 * max(len(params), 1), 4), squeeze=False)
    for ax, param in zip(axes[0], params):
        for model, part in profile[profile["parameter"] == param].groupby("model", sort=False):
            line, = ax.plot(part["layer"], part["mean"], marker="o", label=model)
            if (part["max"] > part["min"]).any():
                ax.fill_between(part["layer"], part["min"], part["max"], color=line.get_color(), alpha=0.2)
        ax.set(xlabel="layer", ylabel=param, title=f"{param} by layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    return _save(fig, path)


def parameter_importances(study: optuna.Study) -> dict[str, float] | None:
    """fANOVA importances (seeded, so reports are stable), or None with too few trials to mean anything."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return None
    try:
        return optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError):  # e.g. every trial has the same parameters
        return None


def plot_importances(importances: dict[str, float], path: Path) -> Path:
    plt = _pyplot()
    top = list(importances.items())[:MAX_IMPORTANCES_SHOWN][::-1]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.3 * len(top)))
    ax.barh([k for k, _ in top], [v for _, v in top])
    ax.set(xlabel="importance (fANOVA)", title="Parameter importances")
    return _save(fig, path)


# --- the report ---------------------------------------------------------------------------------------

def _embedded(png: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}" alt="{png.stem}"></figure>'


def leaderboard_notes(frame: pd.DataFrame, rows: list[Row], config: SearchConfig) -> list[str]:
    """What the leaderboard's Δ and CI columns mean, per task metric of the objective."""
    reference = frame.attrs.get("reference")
    notes = [f"Δ: difference of the objective (the weighted average) to {reference}, the best of the base and "
             "the sources on the search split. CI: paired bootstrap 95% over documents, per task metric:"
             if reference else "Δ: no base or source was scored."]
    scores = rows[0].search
    notes += [f"{task} {metric}: {ci_method(scores, task, metric)}"
              for task, metric, _ in _task_metrics(config, scores)]
    lower = sorted({m for _, m, _ in _task_metrics(config, scores) if m.split(",")[0] in PROBABILITY_FORMS})
    if lower:
        notes.append(f"Lower-is-better {', '.join(lower)} enter the objective as the geometric-mean probability "
                     "per unit (1/perplexity, 2^-bits_per_byte); the task columns show the metric itself.")
    return notes


def write_html(path: Path, *, title: str, facts: dict[str, Any], table: pd.DataFrame, plots: list[Path],
               recipe_text: str, notes: list[str] | None = None) -> Path:
    facts_html = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}"
             "img{max-width:100%}pre{background:#f7f7f7;padding:1em;overflow:auto}")
    body = (f"<h1>{html.escape(title)}</h1><table>{facts_html}</table><h2>Leaderboard</h2>"
            f"{table.to_html(index=False, border=0)}"
            + "".join(f"<p>{html.escape(note)}</p>" for note in notes or []) +
            f"<h2>Plots</h2>{''.join(_embedded(p) for p in plots)}"
            f"<h2>Best recipe</h2><pre>{html.escape(recipe_text)}</pre>")
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>{style}</style></head><body>{body}</body></html>")
    return path


def write_report(run_dir: str | Path, *, storage: str | None = None, study_name: str | None = None, top_k: int = 3,
                 test: bool = True, merge: bool = False, evaluator=None, progress: bool = False) -> Path:
    """Write the run's report into ``run_dir``; returns the path of ``report.html``.

    ``evaluator`` replaces the test-split lm-eval evaluator (tests inject a cheap one, as ``search`` allows).
    """
    if top_k < 1:
        raise EvomergeError(f"--top-k must be at least 1, got {top_k}")
    run_dir = Path(run_dir)
    storage = storage or default_storage(run_dir)
    db_file = _sqlite_file(storage)
    if db_file is None or db_file.is_file():  # else there is no study here, which is said first
        check_writable_dir(run_dir, "run directory")  # SQLite too: a WAL database writes its -shm file there
    rdb = open_storage_read_only(run_dir, storage)
    try:
        return _write_report(run_dir, rdb, storage, study_name, top_k, test, merge, evaluator, progress)
    finally:
        _close(rdb)


def _write_report(run_dir: Path, rdb: RDBStorage, storage: str, study_name: str | None, top_k: int, test: bool,
                  merge: bool, evaluator, progress: bool) -> Path:
    study = load_evomerge_study(rdb, storage, study_name)
    run_dir.mkdir(parents=True, exist_ok=True)  # a study in a server database may have no run directory yet
    storage_url = _public_url(storage)
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
             "trials": f"{states[TrialState.COMPLETE]} complete, {states[TrialState.RUNNING]} running, "
                       f"{states[TrialState.FAIL]} failed",
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


def write_best_model(recipe_path: Path, out_dir: Path, leaderboard_md: str) -> Path:
    """Merge the best recipe to disk (replacing an earlier one), its model card carrying the leaderboard."""
    recipe = load_recipe(recipe_path)
    merge_to_disk(recipe, out_dir, force=True, recipe_dir=recipe_path.parent)
    card = model_card(recipe, recipe.evomerge.seed if recipe.evomerge else None)
    (out_dir / "README.md").write_text(f"{card}\n## Leaderboard\n\n{leaderboard_md}")
    return out_dir
