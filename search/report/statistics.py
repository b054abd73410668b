"""Confidence intervals of the leaderboard: paired bootstrap over documents, per task metric of the objective."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from evaluators.base import Scores, corpus_probability
from merge_core.errors import EvomergeError
from search.config import SearchConfig
from search.objectives import FROM_PROBABILITY, Bound, Objective, metric_key, task_metric

__all__ = ["BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "ci_method", "margin_interval", "paired_bootstrap",
           "resampled_metric", "task_metrics"]

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def task_metrics(config: SearchConfig, scores: Scores) -> list[tuple[str, str, float]]:
    """(task, metric, weight) of every task scored (``tasks``, then held-out texts not among them at weight 1), the
    metric defaulting to the task's primary one."""
    weights = {t.name: t.weight for t in config.tasks}
    return [(task, task_metric(config, scores, task), weights.get(task, 1.0)) for task in config.scored_tasks]


def resampled_metric(task: Any, metric: str, idx: np.ndarray) -> np.ndarray | None:
    """Each resample's value of the metric itself (``idx``: resamples × documents): the mean of per-document
    values, or for a corpus-level metric the ratio of sums recomputed (``corpus_probability``) and turned
    back into the metric (perplexity = 1/p, bits_per_byte = −log2 p). None when the metric has no
    per-document form to resample."""
    x = np.asarray(task.samples.get(metric, []), dtype=float)
    if metric in task.counts:
        probability = corpus_probability(x[idx], np.asarray(task.counts[metric], dtype=float)[idx], axis=1)
        inverse = FROM_PROBABILITY.get(metric_key(metric))
        return None if inverse is None else inverse(probability)
    if x.size == 0:
        return None
    return x[idx].mean(axis=1)


def ci_method(scores: Scores, task: str, metric: str) -> str:
    """How the leaderboard's CI treats this task's metric, in words (shown under the table)."""
    score = scores.tasks[task]
    if not score.samples.get(metric):
        return "no CI: the evaluator kept no per-document values"
    if metric in score.counts:
        return ("documents resampled, the corpus-level value recomputed as a ratio of sums "
                "(exp(Σ log-likelihood / Σ units))")
    return "documents resampled, the mean of per-document values recomputed"


def _indices(rng: np.random.Generator, a: Scores, b: Scores, task: str, metric: str, resamples: int):
    size = len(a.tasks[task].samples.get(metric, []))
    if size == 0 or size != len(b.tasks[task].samples.get(metric, [])):
        return None
    return rng.integers(0, size, size=(resamples, size))


def paired_bootstrap(a: Scores, b: Scores, config: SearchConfig, *, objective: Objective | None = None,
                     tasks: list[str] | None = None, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% CI of value(a) − value(b), the value being the objective's weighted average over ``tasks`` (default:
    the config's tasks): documents are resampled with the same indices for both models (per task), so the CI
    reflects how the two differ on the same items, not the items' own spread. Each resample's task value is
    the metric recomputed from the resampled documents (a mean, or a corpus-level ratio of sums) and then
    oriented and scaled as the objective takes it (``objective``, default the raw scale). NaN when a task lacks
    per-document values or the two were scored on different documents."""
    objective = objective or Objective(config)
    rng = np.random.default_rng(seed)
    tasks = tasks or [t.name for t in config.tasks]
    total = sum(objective.weight(t) for t in tasks)
    diff = np.zeros(resamples)
    for task in tasks:
        metric = task_metric(config, a, task)
        idx = _indices(rng, a, b, task, metric, resamples)
        if idx is None:
            return math.nan, math.nan
        ra, rb = resampled_metric(a.tasks[task], metric, idx), resampled_metric(b.tasks[task], metric, idx)
        if ra is None or rb is None:
            return math.nan, math.nan
        higher = a.higher_is_better(task, metric)
        try:
            va = objective.transform(task, metric, higher, ra, alone=len(tasks) == 1)
            vb = objective.transform(task, metric, higher, rb, alone=len(tasks) == 1)
        except EvomergeError:
            return math.nan, math.nan
        diff += objective.weight(task) / total * (va - vb)
    low, high = np.percentile(diff, [2.5, 97.5])
    return float(low), float(high)


def margin_interval(candidate: Scores, reference: Scores | None, bound: Bound, reference_value: float, *,
                    resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% CI of a constraint's margin (≥ 0: satisfied): with a reference model, its documents resampled with
    the candidate's (paired), so the bound moves with the reference; with a number, the candidate alone."""
    rng = np.random.default_rng(seed)
    other = reference if reference is not None else candidate
    idx = _indices(rng, candidate, other, bound.task, bound.metric, resamples)
    if idx is None:
        return math.nan, math.nan
    value = resampled_metric(candidate.tasks[bound.task], bound.metric, idx)
    ref = resampled_metric(reference.tasks[bound.task], bound.metric, idx) if reference is not None else reference_value
    if value is None or ref is None:
        return math.nan, math.nan
    low, high = np.percentile(bound.margin(value, ref), [2.5, 97.5])
    return float(low), float(high)
