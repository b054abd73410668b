"""PS + DFS: a config with both ``parameters`` and ``routing`` runs the parameter search, then a layer-path
search whose sources include the parameter search's best merge (``merge`` in ``routing.sources``).

The best merge is written to disk once, under ``<run>/routing/merge_trial<N>/`` (a source on disk is what
the stage's exported recipes and mergekit can name); the layer-path stage is its own study in the same
storage (``<study>-routing``), with its report in ``<run>/routing/``, and it records the trial it started
from (``stage1``). Resuming runs both stages again: a finished stage returns at once.
"""

from __future__ import annotations

from pathlib import Path

import optuna

from merge_core.engine import merge
from merge_core.errors import EvomergeError
from merge_core.recipe import load_recipe
from search.config import SearchConfig
from search.routing import STAGE_DIR, stage_config

__all__ = ["STAGE1_KEY", "run_stages", "routing_stage"]

STAGE1_KEY = "stage1"


def routing_stage(study: optuna.Study, config: SearchConfig) -> tuple[SearchConfig, dict]:
    """The layer-path stage after the parameter search ``study``: its config, and what it records of stage 1.
    Writes the best merge (by the report's rule) to disk unless a previous start did."""
    from search.report.pareto import choose_best
    from search.report.storage import completed_trials

    best = choose_best(completed_trials(study), config)[0][0]
    merge_dir = (config.run_dir / STAGE_DIR / f"merge_trial{best.number}").resolve()
    if not (merge_dir / "config.json").is_file():
        try:
            merge(load_recipe(best.user_attrs["recipe"]), merge_dir, seed=config.seed, force=merge_dir.exists())
        except EvomergeError:
            if not (merge_dir / "config.json").is_file():  # else another worker wrote the same merge first
                raise
    record = {"study": config.study, "run_dir": str(config.run_dir.resolve()), "trial": best.number,
              "merge": str(merge_dir)}
    return stage_config(config, merge_dir), record


def run_stages(config: SearchConfig, *, config_dir: Path | None = None, **kwargs) -> list[tuple[SearchConfig,
                                                                                               optuna.Study]]:
    """Each stage's (config, study): the one search, or with PS + DFS the parameter search then the layer
    paths. ``kwargs`` go to ``search.loop.search``."""
    from search.loop import search, self_contained

    study = search(config, config_dir=config_dir, **kwargs)
    stages = [(config, study)]
    if config.routing is None or config.routing_only:
        return stages
    stage, record = routing_stage(study, self_contained(config, config_dir))
    routed = search(stage, **kwargs)
    if routed.user_attrs.get(STAGE1_KEY) != record:
        routed.set_user_attr(STAGE1_KEY, record)
    return stages + [(stage, routed)]
