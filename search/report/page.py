"""The report as one self-contained HTML page (plots embedded), readable offline and mailable."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["write_html"]


def _embedded(png: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}" alt="{png.stem}"></figure>'


def write_html(path: Path, *, title: str, facts: dict[str, Any], table: pd.DataFrame, plots: list[Path],
               recipe_text: str, notes: list[str] | None = None,
               sections: list[tuple[str, pd.DataFrame, str]] | None = None) -> Path:
    """``sections``: (title, table, text below it) after the leaderboard, e.g. the Pareto front."""
    facts_html = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}"
             "img{max-width:100%}pre{background:#f7f7f7;padding:1em;overflow:auto}")
    body = (f"<h1>{html.escape(title)}</h1><table>{facts_html}</table><h2>Leaderboard</h2>"
            f"{table.to_html(index=False, border=0)}"
            + "".join(f"<p>{html.escape(note)}</p>" for note in notes or [])
            + "".join(f"<h2>{html.escape(name)}</h2>{frame.to_html(index=False, border=0)}"
                      + (f"<p>{html.escape(text)}</p>" if text else "") for name, frame, text in sections or []) +
            f"<h2>Plots</h2>{''.join(_embedded(p) for p in plots)}"
            f"<h2>Best recipe</h2><pre>{html.escape(recipe_text)}</pre>")
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>{style}</style></head><body>{body}</body></html>")
    return path

