"""The source model inventory: what each model the search started from is, and how it scored."""

from __future__ import annotations

import pandas as pd

from search.config import SearchConfig
from search.report.leaderboard import Row, rank_score, split_objective

__all__ = ["source_inventory"]


def source_inventory(rows: list[Row], baselines: dict, config: SearchConfig) -> pd.DataFrame:
    """One row per base and source: path, what it is a fine-tune (or adapter) of, architecture, parameter count,
    a SHA-256 of its weight files (recorded when the search scored it), and its score on each split."""
    splits = [s for s in ("search", "test") if all(getattr(r, s) is not None for r in rows)]
    objectives = {s: split_objective(rows, config, s) for s in splits}
    base = next((r.name for r in rows if r.role == "base"), "?")
    records = []
    for row in (r for r in rows if r.role in ("base", "source")):
        facts = baselines.get(row.name, {}).get("inventory", {})
        parameters = facts.get("parameters")
        record = {"model": row.name, "role": row.role, "path": row.model,
                  "base": "" if row.role == "base" else facts.get("adapter_of", base),
                  "architecture": facts.get("architecture", "?"),
                  "parameters": f"{parameters:,}" if isinstance(parameters, int) else "?",
                  "weights sha256": facts.get("sha256", "?")[:16]}
        for s in splits:
            record[f"score ({s})"] = round(rank_score(objectives[s], getattr(row, s)), 6)
        records.append(record)
    return pd.DataFrame.from_records(records)
