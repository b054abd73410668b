"""Scoring live models: lm-eval tasks and held-out perplexity, returning typed, JSON-friendly ``Scores``."""

from evaluators.base import Evaluator, Scores, TaskScore, comparable_value, weighted_average
from evaluators.combined import CombinedEvaluator
from evaluators.lm_eval_evaluator import LmEvalEvaluator
from evaluators.loading import load_model
from evaluators.perplexity import PerplexityEvaluator
from evaluators.tasks import DEFAULT_INCLUDE_PATH

__all__ = ["DEFAULT_INCLUDE_PATH", "CombinedEvaluator", "Evaluator", "LmEvalEvaluator", "PerplexityEvaluator",
           "Scores", "TaskScore", "comparable_value", "load_model", "weighted_average"]
