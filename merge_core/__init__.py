"""The merge core: mergekit recipes → typed models → tensors merged to disk or into a live model."""

from merge_core.engine import merge, merge_into, open_sources
from merge_core.errors import EvomergeError
from merge_core.plan import plan_merge
from merge_core.recipe import Recipe, load_recipe

__all__ = ["EvomergeError", "Recipe", "load_recipe", "merge", "merge_into", "open_sources", "plan_merge"]
