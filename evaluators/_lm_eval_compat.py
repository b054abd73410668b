"""The one place that uses lm-eval's private API; ``tests/test_compat.py`` fails loudly when it moves.

Needed for what lm-eval 0.4 offers no public call for: a task's filter names (per-filter metric keys
such as ``exact_match,strict-match``) and its filters applied to some of its instances, whether an indexed
name is a tag or a task (to load a tag's YAML tasks with evomerge's path handling), and a cache for the
Jinja templates it recompiles per document.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["apply_filters", "cache_prompt_templates", "filter_names", "is_tag", "is_yaml_task"]


def filter_names(task: Any) -> list[str]:
    return [f.name for f in task._filters]


def apply_filters(task: Any, instances: list) -> None:
    """``task.apply_filters()`` on some of its instances only: a candidate scored on a subset of the documents
    (multi-fidelity) has no responses for the others, which lm-eval's filters would index."""
    for ensemble in task._filters:
        ensemble.apply(instances)


def is_tag(entry: Any) -> bool:
    from lm_eval.tasks._index import Kind

    return entry.kind == Kind.TAG


def is_yaml_task(entry: Any) -> bool:
    from lm_eval.tasks._index import Kind

    return entry.kind == Kind.TASK and entry.yaml_path is not None


def cache_prompt_templates() -> None:
    """lm-eval compiles a task's Jinja template on every ``doc_to_target``/``doc_to_choice`` call, which
    ``process_results`` makes per document per score; a compiled template depends only on its text.
    Installed once, by the evaluator that scores (never at import)."""
    from lm_eval import utils

    if not hasattr(utils.env.from_string, "cache_info"):
        utils.env.from_string = functools.lru_cache(maxsize=4096)(utils.env.from_string)
