"""What every evaluator returns: per-task metrics with their direction and per-sample values.

Per-sample values are kept (in stable document order) because the report compares candidates with a
paired bootstrap, which needs the same documents scored by both models. Corpus-level metrics (perplexities,
bits per byte) are not means of per-document values but ratios of sums, so for them each document's
log-likelihood and its unit count (tokens, words or bytes) are kept, and a resample recomputes the ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from merge_core.errors import EvomergeError

# Lower-is-better metrics that ``weighted_average`` can make comparable, each turned into the geometric-mean
# probability per unit (token, word or byte) = exp(sum log-likelihood / sum units): a higher-is-better number in
# (0, 1] like an accuracy. 1/perplexity is that number; bits_per_byte = log2(byte_perplexity), so 2^-bits_per_byte.
PROBABILITY_FORMS: dict[str, Callable[[float], float]] = {
    "perplexity": lambda v: 1.0 / v,
    "word_perplexity": lambda v: 1.0 / v,
    "byte_perplexity": lambda v: 1.0 / v,
    "bits_per_byte": lambda v: 2.0 ** -v,
}
RECIPROCAL_METRICS = frozenset(m for m in PROBABILITY_FORMS if m.endswith("perplexity"))


@dataclass(frozen=True)
class TaskScore:
    """One task's metrics (lm-eval's aggregate values) and, per metric, the per-document values.

    ``samples[metric]`` holds lm-eval's per-document value in document order (e.g. 0/1 correctness for
    ``acc``/``exact_match``); metrics whose per-document value is not a number (``brier_score``, ``f1``…)
    have no samples. For a corpus-level metric (a ratio of sums, e.g. ``byte_perplexity`` =
    exp(-sum log-likelihood / sum bytes)), ``samples[metric]`` holds each document's log-likelihood and
    ``counts[metric]`` its units (bytes, words, tokens; 1 per document for lm-eval's ``perplexity``), and
    ``corpus_probability`` of the two is the metric's ``PROBABILITY_FORMS`` value. The first metric is the
    task's primary one.
    """

    metrics: dict[str, float]
    higher_is_better: dict[str, bool]
    samples: dict[str, list[float]] = field(default_factory=dict)
    n: int = 0
    counts: dict[str, list[float]] = field(default_factory=dict)

    @property
    def primary_metric(self) -> str:
        return next(iter(self.metrics))

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": dict(self.metrics), "higher_is_better": dict(self.higher_is_better),
                "samples": {k: list(v) for k, v in self.samples.items()}, "n": self.n,
                "counts": {k: list(v) for k, v in self.counts.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskScore:
        return cls(metrics={k: float(v) for k, v in data["metrics"].items()},
                   higher_is_better={k: bool(v) for k, v in data["higher_is_better"].items()},
                   samples={k: [float(x) for x in v] for k, v in data.get("samples", {}).items()},
                   n=int(data.get("n", 0)),
                   counts={k: [float(x) for x in v] for k, v in data.get("counts", {}).items()})


@dataclass(frozen=True)
class Scores:
    """All tasks scored for one model, plus the wall time the scoring took."""

    tasks: dict[str, TaskScore]
    seconds: float = 0.0

    def value(self, task: str, metric: str | None = None) -> float:
        """The value of ``metric`` (default: the task's primary metric) on ``task``."""
        score = self._task(task)
        metric = metric or score.primary_metric
        if metric not in score.metrics:
            raise EvomergeError(f"task {task!r} has no metric {metric!r} (it has: {', '.join(score.metrics)})")
        return score.metrics[metric]

    def higher_is_better(self, task: str, metric: str | None = None) -> bool:
        score = self._task(task)
        return score.higher_is_better[metric or score.primary_metric]

    def merged(self, other: Scores) -> Scores:
        """Both evaluators' tasks in one ``Scores`` (e.g. lm-eval tasks plus perplexity); times add up."""
        overlap = set(self.tasks) & set(other.tasks)
        if overlap:
            raise EvomergeError(f"tasks scored twice: {', '.join(sorted(overlap))}")
        return Scores(tasks={**self.tasks, **other.tasks}, seconds=self.seconds + other.seconds)

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": {name: score.to_dict() for name, score in self.tasks.items()}, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scores:
        return cls(tasks={name: TaskScore.from_dict(s) for name, s in data["tasks"].items()},
                   seconds=float(data.get("seconds", 0.0)))

    def _task(self, task: str) -> TaskScore:
        if task not in self.tasks:
            raise EvomergeError(f"no scores for task {task!r} (scored: {', '.join(self.tasks)})")
        return self.tasks[task]


def check_objective_metric(task: str, metric: str, higher_is_better: bool) -> None:
    """Refuse a metric that cannot enter the objective: lower-is-better without a probability form
    (brier_score, nll…), which would otherwise be silently negated into an average with accuracies."""
    if not higher_is_better and metric.split(",")[0] not in PROBABILITY_FORMS:
        raise EvomergeError(f"task {task!r}: metric {metric!r} is lower-is-better and has no higher-is-better form "
                            "for the objective (lower-is-better metrics it takes: "
                            f"{', '.join(sorted(PROBABILITY_FORMS))}); pick another metric")


def comparable_value(scores: Scores, task: str, metric: str | None = None) -> float:
    """The metric as a higher-is-better number: as is, or its ``PROBABILITY_FORMS`` value (1/perplexity,
    2^-bits_per_byte: the geometric-mean probability per unit). Other lower-is-better metrics are refused."""
    score = scores.tasks.get(task)
    metric = metric or (score.primary_metric if score else None)
    value = scores.value(task, metric)
    higher = scores.higher_is_better(task, metric)
    check_objective_metric(task, metric, higher)
    if higher:
        return value
    form = PROBABILITY_FORMS[metric.split(",")[0]]
    return form(value) if value > 0 and math.isfinite(value) else 0.0


def corpus_probability(log_likelihoods: Any, counts: Any, axis: int = -1) -> Any:
    """exp(sum log-likelihood / sum units) (numpy arrays: along ``axis``): the probability form of a
    corpus-level metric, recomputed from its documents (e.g. on a bootstrap resample)."""
    import numpy as np

    return np.exp(np.sum(log_likelihoods, axis=axis) / np.sum(counts, axis=axis))


def weighted_average(scores: Scores, weights: dict[str, float], metrics: dict[str, str] | None = None) -> float:
    """The weighted mean over tasks of each task's metric (default: its primary), made higher-is-better.

    Lower-is-better metrics follow ``comparable_value``: perplexities enter as 1/perplexity, bits_per_byte as
    2^-bits_per_byte, others are refused.
    """
    if not weights:
        raise EvomergeError("weighted_average needs at least one task weight")
    total = sum(weights.values())
    if total <= 0 or any(w < 0 for w in weights.values()):
        raise EvomergeError(f"task weights must be non-negative with a positive sum, got {weights}")
    metrics = metrics or {}
    return sum(w * comparable_value(scores, task, metrics.get(task)) for task, w in weights.items()) / total


class Evaluator(Protocol):
    """Scores a live model: the search calls it once per candidate, with weights changed in place."""

    def score(self, model: Any, tokenizer: Any) -> Scores: ...
