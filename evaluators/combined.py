"""Several evaluators as one: lm-eval tasks and held-out perplexity texts scored for the same candidate."""

from __future__ import annotations

from typing import Any, Iterator

from evaluators.base import Scores
from merge_core.errors import EvomergeError

__all__ = ["CombinedEvaluator"]


class CombinedEvaluator:
    """Scores a live model with each evaluator in turn and merges their ``Scores`` (task names must differ).

    What the search asks of an evaluator beyond ``score`` (the metrics each task reports, their directions,
    document counts and nested subsets for multi-fidelity) is answered from the members that can; a member
    that scores no subsets (a perplexity text) is scored in full once, with the first rung, and its scores
    are carried through the later rungs."""

    def __init__(self, evaluators: list[Any]):
        if not evaluators:
            raise EvomergeError("nothing to score: no task and no perplexity text")
        self.evaluators = list(evaluators)

    def score(self, model: Any, tokenizer: Any) -> Scores:
        scores = Scores(tasks={})
        for evaluator in self.evaluators:
            scores = scores.merged(evaluator.score(model, tokenizer))
        return scores

    @property
    def task_names(self) -> list[str]:
        return [name for e in self.evaluators for name in self._names(e)]

    @staticmethod
    def _names(evaluator: Any) -> list[str]:
        names = getattr(evaluator, "task_names", None)
        return list(names) if names is not None else [getattr(evaluator, "task_name")]

    @property
    def metric_names(self) -> dict[str, list[str]] | None:
        out: dict[str, list[str]] = {}
        for e in self.evaluators:
            names = getattr(e, "metric_names", None)
            if names is None:
                return None
            out.update(names)
        return out

    def metric_directions(self) -> dict[str, dict[str, bool]]:
        out: dict[str, dict[str, bool]] = {}
        for e in self.evaluators:
            if hasattr(e, "metric_directions"):
                out.update(e.metric_directions())
        return out

    def document_counts(self) -> dict[str, int]:
        return {name: n for e in self.evaluators if hasattr(e, "document_counts")
                for name, n in e.document_counts().items()}

    def score_rungs(self, model: Any, tokenizer: Any, rungs: list[int | None]) -> Iterator[Scores]:
        whole = [e for e in self.evaluators if not hasattr(e, "score_rungs")]
        staged = [e for e in self.evaluators if hasattr(e, "score_rungs")]
        fixed = Scores(tasks={})
        for e in whole:
            fixed = fixed.merged(e.score(model, tokenizer))
        if not staged:
            for _ in rungs:
                yield fixed
            return
        streams = [e.score_rungs(model, tokenizer, rungs) for e in staged]
        for parts in zip(*streams):
            scores = fixed
            for part in parts:
                scores = scores.merged(part)
            yield scores
