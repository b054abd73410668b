"""The report's plots (matplotlib, headless): history, per-task bars, parameters by layer, importances."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from merge_core.architecture import parse_layer
from merge_core.engine import open_sources
from merge_core.plan import plan_merge
from merge_core.recipe import load_recipe
from search.config import SearchConfig
from search.loop import rank_value
from search.report.leaderboard import SPLITS, Row
from search.report.pareto import feasible
from search.report.statistics import task_metrics
from search.space import model_labels

__all__ = ["layer_profile", "parameter_importances", "plot_history", "plot_importances", "plot_layer_profile",
           "plot_pareto", "plot_tasks"]

MIN_TRIALS_FOR_IMPORTANCE = 10
MAX_IMPORTANCES_SHOWN = 20


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
    values = np.array([rank_value(t) for t in trials])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.scatter(numbers, values, s=16, alpha=0.6, label="trial")
    ax.step(numbers, np.maximum.accumulate(values), where="post", color="black", label="best so far")
    for i, (label, b) in enumerate(baselines.items()):
        ax.axhline(b["objective"], linestyle="--", linewidth=1, color=f"C{i + 1}",
                   label=f"{label} ({'base' if b['is_base'] else 'source'})")
    measure = "average" if trials and len(trials[0].values) > 1 else "objective"
    ax.set(xlabel="trial", ylabel=f"{measure} (search split)", title="Optimization history")
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
        tasks = task_metrics(config, getattr(shown[0], split))
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
    """fANOVA importances (seeded, so reports are stable) for what ranks trials (``rank_value``), or None with
    too few trials to mean anything."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return None
    try:
        return optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target=rank_value)
    except (RuntimeError, ValueError):  # e.g. every trial has the same parameters
        return None


def plot_importances(importances: dict[str, float], path: Path) -> Path:
    plt = _pyplot()
    top = list(importances.items())[:MAX_IMPORTANCES_SHOWN][::-1]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.3 * len(top)))
    ax.barh([k for k, _ in top], [v for _, v in top])
    ax.set(xlabel="importance (fANOVA)", title="Parameter importances")
    return _save(fig, path)


def plot_pareto(trials: list[FrozenTrial], front: list[FrozenTrial], best: FrozenTrial, config: SearchConfig,
                baselines: dict, path: Path) -> Path:
    """Two objectives: every trial (infeasible ones as crosses), the front as a line, the base and sources as
    labelled points. More: parallel coordinates, one line per Pareto trial over the objectives."""
    plt = _pyplot()
    names = [name for name, _ in config.objective_groups]
    fig, ax = plt.subplots(figsize=(7, 5))
    if len(names) == 2:
        ok = [t for t in trials if feasible(t)]
        bad = [t for t in trials if not feasible(t)]
        ax.scatter([t.values[0] for t in ok], [t.values[1] for t in ok], s=16, alpha=0.5, label="trial")
        if bad:
            ax.scatter([t.values[0] for t in bad], [t.values[1] for t in bad], s=16, marker="x", color="grey",
                       alpha=0.6, label="infeasible trial")
        line = sorted(front, key=lambda t: t.values[0])
        ax.plot([t.values[0] for t in line], [t.values[1] for t in line], "o-", color="black", label="Pareto front")
        ax.scatter([best.values[0]], [best.values[1]], s=120, marker="*", color="C3", zorder=5, label="best")
        for i, (label, b) in enumerate(baselines.items()):
            if len(b.get("values", [])) == 2:
                role = "base" if b["is_base"] else "source"
                ax.scatter(*b["values"], marker="s", color=f"C{i + 4}", label=f"{label} ({role})")
        ax.set(xlabel=names[0], ylabel=names[1], title="Objectives (search split)")
    else:
        x = np.arange(len(names))
        for trial in front:
            style = dict(color="C3", linewidth=2.5, label=f"best (trial {trial.number})") if trial is best else dict(
                color="C0", alpha=0.5)
            ax.plot(x, trial.values, marker="o", **style)
        for i, (label, b) in enumerate(baselines.items()):
            if len(b.get("values", [])) == len(names):
                ax.plot(x, b["values"], linestyle="--", color=f"C{i + 4}", label=label)
        ax.set_xticks(x, names)
        ax.set(ylabel="objective value", title=f"Pareto front ({len(front)} trials), parallel coordinates")
    ax.legend(fontsize=8)
    return _save(fig, path)
