"""The leaderboard: its rows (base, sources, hand-written and best trials), their test-split scores (cached
in ``RUN_DIR/test_scores.json``), the table with differences and CIs, and what its columns mean."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial

from evaluators.base import PROBABILITY_FORMS, Scores, comparable_value
from evaluators.command import write_json_atomically
from merge_core.errors import EvomergeError
from search.config import SearchConfig
from search.formatting import decimals_for_differences, decimals_to_separate
from search.loop import open_workbench
from search.objectives import Objective, anchors_from, describe_objective
from search.preflight import build_evaluator
from search.report.statistics import ci_method, paired_bootstrap, task_metrics
from search.space import point_method

__all__ = ["SPLITS", "TEST_CACHE", "Row", "display_frame", "leaderboard_frame", "leaderboard_notes",
           "leaderboard_rows", "markdown_table", "perplexity_flags", "rank_score", "ranked_tasks", "reference_row",
           "score_test_split", "split_baselines", "split_objective"]

TEST_CACHE = "test_scores.json"
SPLITS = ("search", "test")


@dataclass
class Row:
    """One leaderboard row: a model the search started from, or a trial's recipe."""

    name: str
    role: str
    search: Scores
    model: str | None = None  # source and base rows: the checkpoint the search read
    trial: FrozenTrial | None = None  # trial rows
    test: Scores | None = None

    @property
    def recipe(self) -> dict[str, Any] | None:
        return self.trial.user_attrs["recipe"] if self.trial else None


def leaderboard_rows(study: optuna.Study, ranked: list[FrozenTrial], top_k: int,
                     config: SearchConfig | None = None) -> list[Row]:
    """Base, sources, the hand-written first trial, then the best and the rest of the top-k trials, and with a
    method list the best trial of each other method (the method rationale compares them on the test split)."""
    baselines = study.user_attrs.get("baselines", {})
    models = sorted(baselines.items(), key=lambda item: not item[1]["is_base"])
    rows = [Row(label, "base" if b["is_base"] else "source", Scores.from_dict(b["scores"]), model=b["model"])
            for label, b in models]
    roles: dict[int, list[str]] = {}
    handwritten = next((t for t in sorted(ranked, key=lambda t: t.number) if t.user_attrs.get("handwritten")), None)
    if handwritten is not None:
        roles[handwritten.number] = ["hand-written"]
    for rank, trial in enumerate(ranked[:top_k], start=1):
        roles.setdefault(trial.number, []).append("best" if rank == 1 else f"top {rank}")
        if "source" in trial.user_attrs:
            roles[trial.number].append(f"source {trial.user_attrs['source']} as a recipe")
    by_number = {t.number: t for t in ranked}
    order = ([handwritten.number] if handwritten else []) + [t.number for t in ranked[:top_k]]
    if config is not None and len(config.methods) > 1:
        for method, trial in best_per_method(ranked, config).items():
            roles.setdefault(trial.number, []).append(f"best {method}")
            order.append(trial.number)
    for number in dict.fromkeys(order):
        trial = by_number[number]
        rows.append(Row(f"trial {number}", ", ".join(roles[number]), Scores.from_dict(trial.user_attrs["scores"]),
                        trial=trial))
    return rows


def _test_key(row: Row, config: SearchConfig) -> str:
    """Row name + hash of what was scored and how, so a changed recipe or task setting is scored anew."""
    scored = row.recipe if row.recipe is not None else {"model": row.model}
    settings = config.model_dump(include={"tasks", "include_path", "limit", "num_fewshot", "dtype", "seed"})
    digest = hashlib.sha256(json.dumps([scored, settings], sort_keys=True, default=str).encode()).hexdigest()
    return f"{row.name}@{digest[:16]}"


def score_test_split(rows: list[Row], config: SearchConfig, run_dir: Path, evaluator=None,
                     progress: bool = False) -> None:
    """Fill ``row.test`` for every row: from the cache, else by loading the row into the loop's workbench."""
    cache_path = run_dir / TEST_CACHE
    cache = _read_test_cache(cache_path)
    missing = [row for row in rows if _test_key(row, config) not in cache]
    if missing:
        from rich.console import Console

        console = Console(stderr=True, quiet=not progress)
        with console.status("test split: loading models and tasks"):
            bench = open_workbench(config, evaluator=evaluator or build_evaluator(config, split="test"))
        for i, row in enumerate(missing, start=1):
            with console.status(f"test split: scoring {row.name} ({i}/{len(missing)})"):
                if row.recipe is None:
                    bench.load_source(row.model)
                else:
                    bench.materialize(row.recipe)
                cache[_test_key(row, config)] = bench.evaluator.score(bench.model, bench.tokenizer).to_dict()
            # an interrupted report keeps what it has scored
            write_json_atomically(cache_path, cache, "test-split cache")
    for row in rows:
        try:
            row.test = Scores.from_dict(cache[_test_key(row, config)])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise EvomergeError(f"{cache_path}: the entry of {row.name} is not a set of scores "
                                f"(delete the file to score the test split again)") from None


def _read_test_cache(path: Path) -> dict[str, Any]:
    """The cached test-split scores; a cache that is not ours to read is refused, never silently replaced."""
    if not path.exists():
        return {}
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EvomergeError(f"{path}: cannot be read ({exc.strerror})") from None
    except ValueError:
        raise EvomergeError(f"{path}: not valid JSON (delete the file to score the test split again)") from None
    if not isinstance(cache, dict):
        raise EvomergeError(f"{path}: expected a JSON object of test-split scores "
                            f"(delete the file to score the test split again)")
    return cache


def best_per_method(ranked: list[FrozenTrial], config: SearchConfig) -> dict[str, FrozenTrial]:
    """The best-ranked trial of each method tried (``ranked``: best first)."""
    best: dict[str, FrozenTrial] = {}
    for trial in ranked:
        best.setdefault(point_method(config, trial.params), trial)
    return best


def split_baselines(rows: list[Row], split: str) -> dict[str, Scores]:
    """The base's and the sources' scores on one split, by label."""
    return {r.name: getattr(r, split) for r in rows if r.role in ("base", "source") and getattr(r, split) is not None}


def split_objective(rows: list[Row], config: SearchConfig, split: str) -> Objective:
    """The objective with its anchors (the base and the best source per task) from this split's baselines."""
    baselines = split_baselines(rows, split)
    base = next((r.name for r in rows if r.role == "base"), None)
    if base is None or base not in baselines:
        return Objective(config)
    return Objective(config, anchors_from(baselines, base, config))


def ranked_tasks(config: SearchConfig) -> list[str]:
    """The tasks of what ranks trials: the single objective's, or every task of the average."""
    return config.objective_groups[0][1] if not config.multi_objective else [t.name for t in config.tasks]


def rank_score(objective: Objective, scores: Scores) -> float:
    """What ranks a model on one split (``search.loop.rank_value`` for a trial's stored values)."""
    return objective.group_value(scores, ranked_tasks(objective.config))


def reference_row(rows: list[Row], config: SearchConfig) -> Row | None:
    """What a merge must beat: the best of the base and the sources on the search split."""
    starts = [r for r in rows if r.role in ("base", "source")]
    objective = split_objective(rows, config, "search")
    return max(starts, key=lambda r: rank_score(objective, r.search), default=None)


def _probability(scores: Scores, task: str, metric: str) -> float | None:
    return comparable_value(scores, task, metric) if metric.split(",")[0] in PROBABILITY_FORMS else None


def perplexity_flags(rows: list[Row], config: SearchConfig, split: str) -> dict[str, str]:
    """Rows whose perplexity on a task exceeds 2× the best (lowest) of the base and the sources: a broken
    language model, whatever its average says. bits_per_byte counts through its perplexity, 2^bits_per_byte."""
    starts = [r for r in rows if r.role in ("base", "source")]
    flags: dict[str, list[str]] = {}
    for task, metric, _ in task_metrics(config, starts[0].search) if starts else []:
        best = max((_probability(getattr(r, split), task, metric) or 0.0 for r in starts), default=0.0)
        for row in rows:
            value = _probability(getattr(row, split), task, metric)
            if value is not None and value < best / 2:
                flags.setdefault(row.name, []).append(f"{task} perplexity > 2× best source ({split})")
    return {name: "; ".join(found) for name, found in flags.items()}


def leaderboard_frame(rows: list[Row], config: SearchConfig) -> pd.DataFrame:
    """One row per leaderboard row; per split: each task's metric, the objective, and its difference to the
    best of the base and the sources (chosen on the search split; ``frame.attrs["reference"]`` names it) with
    a paired bootstrap 95% CI. Rows that break a perplexity get a ``flag``."""
    reference = reference_row(rows, config)
    splits = [s for s in SPLITS if all(getattr(r, s) is not None for r in rows)]
    objectives = {split: split_objective(rows, config, split) for split in splits}
    tasks = ranked_tasks(config)
    flags: dict[str, str] = {}
    for split in splits:
        for name, flag in perplexity_flags(rows, config, split).items():
            flags[name] = "; ".join(filter(None, [flags.get(name), flag]))
    records = []
    for row in rows:
        record: dict[str, Any] = {"model": row.name, "role": row.role,
                                  "trial": row.trial.number if row.trial else None}
        for split in splits:
            scores: Scores = getattr(row, split)
            objective = objectives[split]
            for task, metric in scored_metrics(config, scores):
                record[f"{task} {metric} ({split})"] = scores.value(task, metric)
            if config.multi_objective:
                for (name, _), value in zip(config.objective_groups, objective.values(scores)):
                    record[f"{name} ({split})"] = value
            record[f"{_rank_column(config)} ({split})"] = rank_score(objective, scores)
            if config.constraints:
                margins = objective.margins(scores, split_baselines(rows, split))
                record[f"feasible ({split})"] = "yes" if all(m >= 0 for m in margins) else "no"
            if reference is not None:
                ref_scores = getattr(reference, split)
                low, high = paired_bootstrap(scores, ref_scores, config, objective=objective, tasks=tasks)
                delta = rank_score(objective, scores) - rank_score(objective, ref_scores)
                record[f"Δ vs {reference.name} ({split})"] = delta
                record[f"Δ CI low ({split})"], record[f"Δ CI high ({split})"] = low, high
        if flags:
            record["flag"] = flags.get(row.name, "")
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    frame.attrs["reference"] = f"{reference.name} ({reference.role})" if reference is not None else None
    return frame


def _rank_column(config: SearchConfig) -> str:
    """The leaderboard column that ranks: ``average``, or the single objective's name."""
    return "average" if not config.objectives or config.multi_objective else config.objective_groups[0][0]


def scored_metrics(config: SearchConfig, scores: Scores) -> list[tuple[str, str]]:
    """(task, metric) of every task scored, the objective's metric first, then the constraints' others."""
    from search.objectives import task_metric

    pairs = [(task, task_metric(config, scores, task)) for task in config.scored_tasks if task in scores.tasks]
    pairs += [(c.task, c.metric) for c in config.constraints if c.metric and c.task in scores.tasks]
    return list(dict.fromkeys(pairs))


def display_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as text: per column, enough decimals (at least 3) to tell its rows apart, each
    difference with two significant digits and its CI in one cell ("no CI" where none can be computed)."""
    shown = pd.DataFrame({"model": frame["model"], "role": frame["role"]})
    for column in frame.columns[3:]:
        if column.startswith("Δ CI "):
            continue
        if column == "flag" or column.startswith("feasible ("):
            shown[column] = frame[column]
        elif column.startswith("Δ vs "):
            split = column.rsplit("(", 1)[1]
            low, high = frame[f"Δ CI low ({split}"], frame[f"Δ CI high ({split}"]
            d = decimals_for_differences(frame[column])
            shown[column + " [95% CI]"] = [
                f"{v:+.{d}f}" + (" (no CI)" if math.isnan(lo) else f" [{lo:+.{d}f}, {hi:+.{d}f}]")
                for v, lo, hi in zip(frame[column], low, high)]
        else:
            d = decimals_to_separate(frame[column])
            shown[column] = [f"{v:.{d}f}" for v in frame[column]]
    return shown


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' ``to_markdown`` needs ``tabulate``, which evomerge does not require)."""
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, frame.columns)) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(frame.columns))) + "|"]
    lines += ["| " + " | ".join(map(cell, values)) + " |" for values in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def leaderboard_notes(frame: pd.DataFrame, rows: list[Row], config: SearchConfig) -> list[str]:
    """What the leaderboard's columns mean: the objective, Δ and its CI per task metric, feasibility."""
    reference = frame.attrs.get("reference")
    ranked = _rank_column(config)
    notes = [f"{ranked}: {describe_objective(config)}."]
    notes.append(f"Δ: difference of {ranked} to {reference}, the best of the base and the sources on the search split. "
                 "CI: paired bootstrap 95% over documents, per task metric:"
                 if reference else "Δ: no base or source was scored.")
    scores = rows[0].search
    notes += [f"{task} {metric}: {ci_method(scores, task, metric)}" for task, metric in scored_metrics(config, scores)]
    lower = sorted({m for _, m in scored_metrics(config, scores) if m.split(",")[0] in PROBABILITY_FORMS})
    if lower and config.objective_scale == "raw":
        notes.append(f"Lower-is-better {', '.join(lower)} enter the objective as the geometric-mean probability "
                     "per unit (1/perplexity, 2^-bits_per_byte); the task columns show the metric itself.")
    if config.constraints:
        notes.append("feasible: every constraint holds on that split, against that split's base and sources.")
    return notes
