"""The method rationale of a search over a method list: which methods were tried, how the best trial of each
did on both splits (with a paired-bootstrap CI against the winner on the test split), and why the winner won."""

from __future__ import annotations

import math
from collections import Counter

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from search.config import SearchConfig
from search.report.leaderboard import (
    Row,
    best_per_method,
    rank_score,
    ranked_tasks,
    split_objective,
)
from search.report.statistics import paired_bootstrap
from search.space import point_method

__all__ = ["method_rationale"]


def method_rationale(study: optuna.Study, order: list[FrozenTrial], rows: list[Row],
                     config: SearchConfig) -> tuple[pd.DataFrame, str]:
    """(table, explanation). ``order``: complete trials with the chosen best first, feasible ones before the
    rest; ``rows``: the leaderboard's, holding each method's best trial."""
    bests = best_per_method(order, config)
    tried = Counter(point_method(config, t.params) for t in study.get_trials(deepcopy=False)
                    if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) and t.params)
    by_trial = {r.trial.number: r for r in rows if r.trial is not None}
    splits = [s for s in ("search", "test") if all(getattr(r, s) is not None for r in by_trial.values())]
    objectives = {s: split_objective(rows, config, s) for s in splits}
    winner_method = point_method(config, order[0].params)
    winner = by_trial[order[0].number]
    records = []
    for method in config.methods:
        record = {"method": method, "trials": tried.get(method, 0)}
        trial = bests.get(method)
        if trial is not None and trial.number in by_trial:
            row = by_trial[trial.number]
            record["best trial"] = trial.number
            for s in splits:
                record[f"best ({s})"] = rank_score(objectives[s], getattr(row, s))
            last = splits[-1]
            if method != winner_method:
                low, high = paired_bootstrap(getattr(winner, last), getattr(row, last), config,
                                             objective=objectives[last], tasks=ranked_tasks(config))
                delta = record[f"best ({last})"] - rank_score(objectives[last], getattr(winner, last))
                record[f"Δ vs winner ({last})"] = f"{delta:+.4f}" + ("" if math.isnan(low) else
                                                                       f" [{-high:+.4f}, {-low:+.4f}]")
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    return frame, _explain(frame, winner_method, splits)


def _explain(frame: pd.DataFrame, winner: str, splits: list[str]) -> str:
    tried = ", ".join(f"{m} ({n} trials)" for m, n in zip(frame["method"], frame["trials"]))
    scored = frame.dropna(subset=["best trial"]) if "best trial" in frame else frame.iloc[0:0]
    last = splits[-1]
    others = scored[scored["method"] != winner].sort_values(f"best ({last})", ascending=False)
    won = scored[scored["method"] == winner].iloc[0]
    text = f"Methods tried: {tried}. {winner} won with trial {int(won['best trial'])}"
    text += "".join(f", {won[f'best ({s})']:.4f} on the {s} split" for s in splits) + "."
    if others.empty:
        return text + " No other method completed a trial."
    runner = others.iloc[0]
    cell = str(runner.get(f"Δ vs winner ({last})", ""))
    text += (f" The runner-up, {runner['method']} (trial {int(runner['best trial'])}), scored "
             + ", ".join(f"{runner[f'best ({s})']:.4f} ({s})" for s in splits) + f"; its Δ vs {winner} on the {last} "
             f"split is {cell or 'not computed'}.")
    few = [f"{m} ({n})" for m, n in zip(frame["method"], frame["trials"]) if m != winner and n < won["trials"] / 3]
    if few:
        text += (f" Trials per method differ (the sampler spends more where scores are high): {', '.join(few)} had "
                 f"under a third of {winner}'s {int(won['trials'])}, so a low best there may mean too few trials "
                 "rather than a worse method; a search over that method alone settles it.")
    if "[" in cell:
        low, high = (float(x) for x in cell[cell.index("[") + 1:cell.index("]")].split(","))
        if high < 0:
            text += (f" The CI lies below 0: {winner}'s best beats {runner['method']}'s best on held-out items too, "
                     "not only on the search split.")
        else:
            text += (f" The CI includes 0: on these items {winner} and {runner['method']} are not distinguishable, "
                     f"and {winner} is chosen for its search-split score.")
    return text
