"""The recipes a report exports (best, top k), and the best model merged to disk with its model card."""

from __future__ import annotations

import copy
from pathlib import Path

from optuna.trial import FrozenTrial

from merge_core.engine import merge as merge_to_disk
from merge_core.recipe import Provenance, load_recipe, model_card
from search.loop import rank_value

__all__ = ["export_recipe", "export_top_recipes", "write_best_model"]


def export_recipe(trial: FrozenTrial, path: Path, *, storage: str, study: str, rank: int | None = 1) -> Path:
    """The trial's recipe as a self-contained YAML file: provenance in the ``evomerge:`` block (whose seed
    ``evomerge merge`` uses; mergekit ignores the block) and a comment header for people. ``rank`` None: a
    Pareto trial, which has no rank."""
    data = copy.deepcopy(trial.user_attrs["recipe"])
    stored = data.get("evomerge") or {}
    value = rank_value(trial)
    data["evomerge"] = Provenance(version=stored.get("version"), seed=stored.get("seed"), storage=storage,
                                  study=study, trial=trial.number, objective=value).model_dump(exclude_none=True)
    recipe = load_recipe(data)
    what = f"#{rank}" if rank is not None else "on the Pareto front"
    objectives = (f" (objectives {', '.join(f'{v:.6g}' for v in trial.values)})" if len(trial.values) > 1 else "")
    header = (f"# evomerge recipe {what} of study {study!r}: trial {trial.number}, "
              f"{'average' if len(trial.values) > 1 else 'objective'} {value:.6g} on the search split{objectives}\n"
              f"# Reproduce the evaluated weights: evomerge merge {path.name} OUT_DIR "
              f"(mergekit also accepts this file)\n")
    path.write_text(header + recipe.to_yaml())
    return path


def export_top_recipes(ranked: list[FrozenTrial], run_dir: Path, top_k: int, *, storage: str, study: str) -> None:
    """``recipes/rank<N>_trial<M>.yaml`` for the top k; files of an earlier report are replaced."""
    out = run_dir / "recipes"
    out.mkdir(exist_ok=True)
    for old in out.glob("rank*_trial*.yaml"):
        old.unlink()
    for rank, trial in enumerate(ranked[:top_k], start=1):
        export_recipe(trial, out / f"rank{rank}_trial{trial.number}.yaml", storage=storage, study=study, rank=rank)


def write_best_model(recipe_path: Path, out_dir: Path, leaderboard_md: str) -> Path:
    """Merge the best recipe to disk (replacing an earlier one), its model card carrying the leaderboard."""
    recipe = load_recipe(recipe_path)
    merge_to_disk(recipe, out_dir, force=True, recipe_dir=recipe_path.parent)
    card = model_card(recipe, recipe.evomerge.seed if recipe.evomerge else None)
    (out_dir / "README.md").write_text(f"{card}\n## Leaderboard\n\n{leaderboard_md}")
    return out_dir

