"""Several objectives and constraints in a report: feasibility, the Pareto front, and which trial is "best".

The best recipe is chosen by one documented rule: among feasible trials (every constraint holds on the search
split; all trials when none is feasible, which the report then says), in a multi-objective study the Pareto
trial with the best weighted average over ``tasks``, in a single-objective study the trial with the best
objective. Without constraints every trial is feasible. Ties are common (exact match reaches its ceiling on a
whole plateau of recipes): among three or more tied trials the one nearest the median of their parameters
(each scaled to its range) wins, the middle of the plateau rather than its edge, which is least sensitive to
the items scored; otherwise the earliest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from optuna.trial import FrozenTrial

from search.config import SearchConfig
from search.loop import rank_key, rank_value
from search.report.recipes import export_recipe

__all__ = ["central", "choose_best", "export_pareto_recipes", "feasible", "pareto_frame", "pareto_front"]


def feasible(trial: FrozenTrial) -> bool:
    return bool(trial.user_attrs.get("feasible", True))


def pareto_front(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials no other trial dominates (every objective maximized), in trial order."""
    values = np.array([t.values for t in trials], dtype=float)
    front = []
    for i, trial in enumerate(trials):
        dominated = np.any(np.all(values >= values[i], axis=1) & np.any(values > values[i], axis=1))
        if not dominated:
            front.append(trial)
    return sorted(front, key=lambda t: t.number)


def choose_best(ranked: list[FrozenTrial], config: SearchConfig) -> tuple[list[FrozenTrial], list[FrozenTrial], str]:
    """(trials in leaderboard order with the chosen best first, the Pareto front, the rule applied in words).
    ``ranked``: complete trials best first by ``rank_value``."""
    pool = [t for t in ranked if feasible(t)]
    rule = []
    if config.constraints:
        rule.append(f"{len(pool)} of {len(ranked)} complete trials satisfy every constraint on the search split"
                    if pool else "no trial satisfies every constraint on the search split: the best of all trials "
                                 "is shown, and it is infeasible")
    pool = pool or list(ranked)
    front = pareto_front(pool) if config.multi_objective else []
    candidates = front if config.multi_objective else pool
    top = max(rank_value(t) for t in candidates)
    tied = sorted((t for t in candidates if rank_value(t) == top), key=lambda t: t.number)
    best = central(tied)
    if config.multi_objective:
        rule.append(f"best: the Pareto trial (of {len(front)}) with the best weighted average over tasks")
    else:
        rule.append("best: the trial with the best objective" + (" among feasible ones" if config.constraints else ""))
    if len(tied) >= MIN_TIES_FOR_MEDIAN:
        rule.append(f"{len(tied)} trials tie at {top:.4g}: the one nearest the median of their parameters")
    order = [best] + sorted([t for t in pool if t is not best], key=rank_key)
    order += [t for t in ranked if t not in order]
    return order, front, "; ".join(rule)


MIN_TIES_FOR_MEDIAN = 3


def central(tied: list[FrozenTrial]) -> FrozenTrial:
    """The tied trial nearest the median of the tied trials' parameters (numeric ones they all have, each
    scaled to its distribution's range), or the earliest of fewer than ``MIN_TIES_FOR_MEDIAN``."""
    if len(tied) < MIN_TIES_FOR_MEDIAN:
        return tied[0]
    keys = sorted(k for k in set.intersection(*(set(t.params) for t in tied))
                  if all(isinstance(t.params[k], (int, float)) for t in tied))
    if not keys:
        return tied[0]

    def scaled(trial: FrozenTrial) -> list[float]:
        out = []
        for k in keys:
            d = trial.distributions[k]
            span = getattr(d, "high", 1.0) - getattr(d, "low", 0.0)
            out.append((trial.params[k] - getattr(d, "low", 0.0)) / span if span else 0.0)
        return out

    points = np.array([scaled(t) for t in tied])
    distance = ((points - np.median(points, axis=0)) ** 2).sum(axis=1)
    return tied[int(np.argmin(distance))]  # argmin: the earliest of equally near ones


def pareto_frame(front: list[FrozenTrial], config: SearchConfig, best: FrozenTrial) -> pd.DataFrame:
    """One row per Pareto trial: its objectives and its average on the search split."""
    records = []
    for trial in front:
        record = {"trial": trial.number, "best": "yes" if trial is best else ""}
        record.update({name: value for (name, _), value in zip(config.objective_groups, trial.values)})
        record["average"] = rank_value(trial)
        record["recipe"] = f"recipes/pareto/trial{trial.number}.yaml"
        records.append(record)
    return pd.DataFrame.from_records(records)


def export_pareto_recipes(front: list[FrozenTrial], run_dir: Path, *, storage: str, study: str) -> Path:
    """``recipes/pareto/trial<N>.yaml`` for every Pareto trial; files of an earlier report are replaced."""
    out = run_dir / "recipes" / "pareto"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("trial*.yaml"):
        old.unlink()
    for trial in front:
        export_recipe(trial, out / f"trial{trial.number}.yaml", storage=storage, study=study, rank=None)
    return out
