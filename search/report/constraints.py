"""The constraints checked on the test split for the chosen recipe, each with a paired-bootstrap CI of its margin.

A constraint naming ``best_source`` bounds each task by the source that was best on it on the search split
(chosen there, so the test split is not used to pick the reference), measured on the test split."""

from __future__ import annotations

import math

import pandas as pd

from search.config import SearchConfig
from search.report.leaderboard import Row, split_baselines, split_objective
from search.report.statistics import margin_interval

__all__ = ["constraint_check"]


def _verdict(margin: float, low: float, high: float) -> str:
    point = "holds" if margin >= 0 else "violated"
    if math.isnan(low):
        return f"{point} (no CI)"
    if low >= 0:
        return f"{point}; holds at 95%"
    if high < 0:
        return f"{point}; violated at 95%"
    return f"{point}; undecided at 95% (the CI straddles the bound)"


def constraint_check(best: Row, rows: list[Row], config: SearchConfig, split: str = "test") -> pd.DataFrame:
    """One row per constraint (``every`` expanded): the chosen recipe's margin (≥ 0: satisfied, in the metric's
    units) on the search split and on ``split``, the bound on ``split``, the margin's 95% CI and the verdict."""
    objective = split_objective(rows, config, "search")
    search_refs, split_refs = split_baselines(rows, "search"), split_baselines(rows, split)
    candidate = getattr(best, split)
    records = []
    for bound, search_margin in zip(objective.bounds(best.search), objective.margins(best.search, search_refs)):
        reference = split_refs.get(bound.reference) if isinstance(bound.reference, str) else None
        ref_value = reference.value(bound.task, bound.metric) if reference is not None else float(bound.reference)
        value = candidate.value(bound.task, bound.metric)
        margin = float(bound.margin(value, ref_value))
        low, high = margin_interval(candidate, reference, bound, ref_value)
        records.append({"constraint": bound.label, "margin (search)": search_margin, f"value ({split})": value,
                        f"bound ({split})": float(bound.bound(ref_value)), f"margin ({split})": margin,
                        "margin 95% CI": "no CI" if math.isnan(low) else f"[{low:+.4f}, {high:+.4f}]",
                        "verdict": _verdict(margin, low, high)})
    return pd.DataFrame.from_records(records)
