"""Confidence intervals of the leaderboard: paired bootstrap over documents, per task metric of the objective."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from evaluators.base import Scores, corpus_probability
from search.config import SearchConfig

__all__ = ["BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "ci_method", "paired_bootstrap", "task_metrics"]

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def task_metrics(config: SearchConfig, scores: Scores) -> list[tuple[str, str, float]]:
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
    for task, metric, weight in task_metrics(config, a):
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

