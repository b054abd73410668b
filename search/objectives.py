"""What a candidate's ``Scores`` become for the search: its objective values, its average, its constraints.

Every task value enters oriented so that higher is better, on one of two scales (``objective_scale``):

- ``raw``: the metric itself when higher is better; a lower-is-better corpus metric as its geometric-mean
  probability per unit (1/perplexity, 2^-bits_per_byte), a number in (0, 1] like an accuracy; any other
  lower-is-better metric (brier_score, nll…) negated, but only where it is an objective's only task, since
  negated values cannot be averaged with accuracies.
- ``relative``: each task measured against the models the search starts from, in the metric's own units and
  direction: ``(value − base) / |best source − base|``, negated for a lower-is-better metric. So 0 is the base,
  +1 the best source where it beats the base (−1 where it is worse), whatever the metric's scale or direction,
  and tasks of different scales average fairly. Where the best source equals the base the divisor is 1.

The anchors (base and best source per task) are the baselines' scores on the split being scored: the search
split during the search, the test split in the report's test columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from evaluators.base import PROBABILITY_FORMS, RECIPROCAL_METRICS, Scores
from merge_core.errors import EvomergeError
from search.config import EVERY_TASK, SearchConfig

__all__ = ["Anchor", "Bound", "Objective", "anchors_from", "describe_objective", "metric_key", "task_metric"]

# The metric as a number from its probability form (for bootstrap resamples of corpus-level metrics).
FROM_PROBABILITY = {"perplexity": lambda p: 1.0 / p, "word_perplexity": lambda p: 1.0 / p,
                    "byte_perplexity": lambda p: 1.0 / p, "bits_per_byte": lambda p: -np.log2(p)}


def metric_key(metric: str) -> str:
    """lm-eval's ``metric,filter`` key without its filter (``exact_match,none`` → ``exact_match``)."""
    return metric.split(",")[0]


def task_metric(config: SearchConfig, scores: Scores, task: str) -> str:
    """The metric of ``task`` the objective reads: the configured one, else the task's primary metric."""
    configured = next((t.metric for t in config.tasks if t.name == task and t.metric), None)
    return configured or scores.tasks[task].primary_metric if task in scores.tasks else configured or ""


@dataclass(frozen=True)
class Anchor:
    """The models a task is measured against: the base's value and the best source's (in the metric's direction)."""

    base: float
    best: float
    best_source: str
    higher: bool

    @property
    def unit(self) -> float:
        spread = abs(self.best - self.base)
        return spread if spread > 0 and math.isfinite(spread) else 1.0


def anchors_from(baselines: dict[str, Scores], base_label: str, config: SearchConfig) -> dict[tuple[str, str], Anchor]:
    """Per (task, metric) the objective or a constraint reads: the base's value and the best source's."""
    base = baselines[base_label]
    sources = {label: s for label, s in baselines.items() if label != base_label}
    pairs = {(task, task_metric(config, base, task)) for task in config.scored_tasks}
    pairs |= {(c.task, c.metric) for c in config.constraints if c.task != EVERY_TASK and c.metric}
    anchors = {}
    for task, metric in sorted(pairs):
        if task not in base.tasks or metric not in base.tasks[task].metrics:
            continue  # checked where it matters (preflight, the first baseline)
        higher = base.higher_is_better(task, metric)
        pick = max if higher else min
        label = pick(sources, key=lambda s: sources[s].value(task, metric)) if sources else base_label
        anchors[(task, metric)] = Anchor(base.value(task, metric), baselines[label].value(task, metric), label, higher)
    return anchors


@dataclass(frozen=True)
class Bound:
    """One constraint on one task: the metric must be no worse than ``bound`` (from ``reference``: ``base``, a
    source's label, or a number), in the metric's direction."""

    label: str
    task: str
    metric: str
    higher: bool
    reference: str | float  # a model's label, or the number given
    tolerance: float
    ratio: float

    def bound(self, reference_value: float | np.ndarray) -> float | np.ndarray:
        if self.higher:
            return reference_value / self.ratio - self.tolerance
        return reference_value * self.ratio + self.tolerance

    def margin(self, value: float | np.ndarray, reference_value: float | np.ndarray) -> float | np.ndarray:
        """How far the value is on the good side of the bound (negative: violated), in the metric's units."""
        bound = self.bound(reference_value)
        return value - bound if self.higher else bound - value


@dataclass
class Objective:
    """The search's view of one config: objective values, average and constraint margins of any ``Scores``.

    ``anchors`` (from the baselines of the split scored) are needed for the relative scale and for
    constraints naming a model; ``None`` is fine for the raw scale without such constraints."""

    config: SearchConfig
    anchors: dict[tuple[str, str], Anchor] | None = None

    # --- task values -----------------------------------------------------------------------------
    def transform(self, task: str, metric: str, higher: bool, raw: Any, alone: bool) -> Any:
        """The raw metric value(s) (a float or a numpy array) oriented and scaled for the objective; ``alone``:
        the task is its objective's only one (the raw scale then negates what it cannot average)."""
        if self.config.objective_scale == "relative":
            anchor = self._anchor(task, metric)
            sign = 1.0 if higher else -1.0
            return sign * (raw - anchor.base) / anchor.unit
        if higher:
            return raw
        form = PROBABILITY_FORMS.get(metric_key(metric))
        if form is not None:
            array = np.asarray(raw, dtype=float)
            usable = np.isfinite(array) & ((array > 0) if metric_key(metric) in RECIPROCAL_METRICS else True)
            with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
                out = np.where(usable, form(np.where(usable, array, 1.0)), 0.0)  # a broken model scores 0
            return float(out) if out.ndim == 0 else out
        if alone:
            return -raw
        raise EvomergeError(f"task {task!r}: metric {metric!r} is lower-is-better and has no higher-is-better form to "
                            f"average with other tasks (lower-is-better metrics that average on the raw scale: "
                            f"{', '.join(sorted(PROBABILITY_FORMS))}); set objective_scale: relative, make it an "
                            "objective of its own, or pick another metric")

    def task_value(self, scores: Scores, task: str, alone: bool = False) -> float:
        metric = task_metric(self.config, scores, task)
        value = scores.value(task, metric)
        return float(self.transform(task, metric, scores.higher_is_better(task, metric), value, alone))

    def weight(self, task: str) -> float:
        return next((t.weight for t in self.config.tasks if t.name == task), 1.0)

    def group_value(self, scores: Scores, tasks: list[str]) -> float:
        """The weighted mean of the tasks' values (weights from ``tasks:``, 1 for held-out texts not listed)."""
        total = sum(self.weight(t) for t in tasks)
        return sum(self.weight(t) * self.task_value(scores, t, alone=len(tasks) == 1) for t in tasks) / total

    def average(self, scores: Scores) -> float:
        """The weighted average over ``tasks``: the single objective, and what picks the best recipe."""
        return self.group_value(scores, [t.name for t in self.config.tasks])

    def values(self, scores: Scores) -> list[float]:
        """One value per objective (``objectives``), or the average alone."""
        if not self.config.objectives:
            return [self.average(scores)]
        return [self.group_value(scores, tasks) for _, tasks in self.config.objective_groups]

    def check_metrics(self, scores: Scores) -> None:
        """Raise the one-line error a baseline's scores give before any trial: a task or metric the objective
        or a constraint reads is missing, or (raw scale) a lower-is-better metric cannot be averaged."""
        for task in self.config.scored_tasks:
            scores.value(task, task_metric(self.config, scores, task))
        for c in self.config.constraints:
            if c.task != EVERY_TASK:
                scores.value(c.task, c.metric or task_metric(self.config, scores, c.task))
        if self.config.objective_scale == "raw":
            self.values(scores)
            self.average(scores)

    # --- constraints -----------------------------------------------------------------------------
    def bounds(self, scores: Scores) -> list[Bound]:
        """The constraints, ``every`` expanded to each task of ``tasks``, with their labels."""
        out = []
        for c in self.config.constraints:
            tasks = [t.name for t in self.config.tasks] if c.task == EVERY_TASK else [c.task]
            for task in tasks:
                metric = c.metric or task_metric(self.config, scores, task)
                higher = scores.higher_is_better(task, metric)
                reference = c.no_worse_than
                if reference == "best_source":
                    reference = self._anchor(task, metric).best_source
                elif reference == "base":
                    reference = self.base_label
                slack = [f"− {c.tolerance:g}" if higher else f"+ {c.tolerance:g}"] if c.tolerance else []
                scale = [f"{'/' if higher else '×'} {c.ratio:g}"] if c.ratio != 1 else []
                ref_text = f"{c.no_worse_than}" + (f" ({reference})" if c.no_worse_than == "best_source" else "")
                label = f"{task} {metric} {'≥' if higher else '≤'} {' '.join([ref_text, *scale, *slack])}"
                out.append(Bound(label, task, metric, higher, reference, c.tolerance, c.ratio))
        return out

    @property
    def base_label(self) -> str:
        from search.space import model_labels

        return model_labels([self.config.base_model, *self.config.models])[self.config.base_model]

    def margins(self, scores: Scores, baselines: dict[str, Scores]) -> list[float]:
        """Each constraint's margin (≥ 0: satisfied), against the baselines of the same split."""
        out = []
        for bound in self.bounds(scores):
            reference = (bound.reference if isinstance(bound.reference, float)
                         else baselines[bound.reference].value(bound.task, bound.metric))
            out.append(float(bound.margin(scores.value(bound.task, bound.metric), reference)))
        return out

    def _anchor(self, task: str, metric: str) -> Anchor:
        if self.anchors is None or (task, metric) not in self.anchors:
            raise EvomergeError(f"task {task!r} metric {metric!r}: the base and the sources have no score to "
                                "measure it against")
        return self.anchors[(task, metric)]


def describe_objective(config: SearchConfig) -> str:
    """The objective in words, for the report's header and the README's example."""
    if config.objective_scale == "relative":
        scale = ("each task relative to the base and the best source on it, in the metric's own direction: "
                 "(value − base) / |best source − base|, so 0 = the base and +1 = the best source (higher is better "
                 "for every metric)")
    else:
        scale = ("each task's metric as it is when higher is better; perplexities as 1/perplexity and bits_per_byte "
                 "as 2^-bits_per_byte (the geometric-mean probability per unit); another lower-is-better metric "
                 "negated where it is its objective's only task")
    tasks = ", ".join(f"{t.name} ×{t.weight:g}" for t in config.tasks)
    text = f"weighted average over tasks ({tasks}) of {scale}"
    if config.objectives:
        groups = "; ".join(f"{name} = {', '.join(tasks)}" for name, tasks in config.objective_groups)
        text += f". Objectives ({len(config.objective_groups)}, each the weighted average over its tasks): {groups}"
    return text
