"""The layer-path search space (Sakana's data-flow space) and the two-stage PS + DFS search.

The candidate slots are an ordered list of (source, layer): by default every layer of each source in
order, the whole sequence ``repeats`` times. A point keeps each slot whose ``keep`` value is above one
half and scales it by its ``scale`` value; a path outside the length bounds is repaired to the nearest
length by the slots' ``keep`` values (the highest kept first), so every point is a valid path and the
sampler needs no constraint. Float ``keep`` dimensions serve every sampler, CMA-ES included.

A PS + DFS search runs the parameter search first, writes its best merge to disk once (a source on disk
is what a recipe and mergekit can name), then searches paths through that merge and the listed sources
as a study of its own beside the first (``<study>-routing``, report in ``<run>/routing``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from merge_core.errors import EvomergeError
from merge_core.routing import Slot, path_recipe
from search.config import MERGE_SOURCE, LayerRange, SearchConfig
from search.space import Dimension, model_labels

__all__ = ["RoutingSpace", "routing_space", "routing_sources", "stage_config", "STAGE_DIR", "STAGE_SUFFIX"]

KEEP = "keep"
SCALE = "scale"
STAGE_DIR = "routing"  # the layer-path stage's run directory, under the parameter search's
STAGE_SUFFIX = "-routing"  # and its study name, after the parameter search's


@dataclass(frozen=True)
class RoutingSpace:
    sources: list[str]  # refs, as the config names them
    slots: list[tuple[str, int]]
    min_layers: int
    max_layers: int
    scale: tuple[float, float] | None
    start: list[tuple[str, int]]
    dtype: str

    @cached_property
    def labels(self) -> dict[str, str]:
        return model_labels(self.sources)

    @cached_property
    def dims(self) -> list[Dimension]:
        labels, dims = self.labels, []
        for i, (ref, layer) in enumerate(self.slots):
            name = f"[{i:02d}:{labels[ref]}.{layer}]"
            dims.append(Dimension(f"{KEEP}{name}", KEEP, ref, None, i, None, 0.0, 1.0, step=1.0))
            if self.scale is not None:
                dims.append(Dimension(f"{SCALE}{name}", SCALE, ref, None, i, None, *self.scale))
        return dims

    def path(self, values: dict[str, Any]) -> list[Slot]:
        """The point's path: the slots kept (``keep`` > 0.5), or the nearest length within the bounds."""
        dims = self.dims
        keep = {d.block: values[d.key] for d in dims if d.param == KEEP}
        scale = {d.block: round(values[d.key], 4) for d in dims if d.param == SCALE}
        ranked = sorted(keep, key=lambda i: -keep[i])  # stable: ties go to the earlier slot
        length = min(max(sum(v > 0.5 for v in keep.values()), self.min_layers), self.max_layers)
        return [Slot(*self.slots[i], scale.get(i, 1.0)) for i in sorted(ranked[:length])]

    def point(self, path: list[tuple[str, int]]) -> dict[str, float] | None:
        """The point whose path is ``path`` at scale 1 (None when the path does not follow the slots' order)."""
        chosen, at = [], 0
        for slot in path:
            while at < len(self.slots) and self.slots[at] != slot:
                at += 1
            if at == len(self.slots):
                return None
            chosen.append(at)
            at += 1
        if not self.min_layers <= len(chosen) <= self.max_layers:
            return None
        point = {}
        for d in self.dims:
            point[d.key] = (1.0 if d.block in chosen else 0.0) if d.param == KEEP else 1.0
        return point

    def neighbors(self, values: dict[str, Any]) -> list[dict[str, float]]:
        """The points one move away from ``values``, each a different path: one slot added or dropped (a
        ``keep`` flipped), or one kept slot swapped for one left out (the same length)."""
        keys = [d.key for d in self.dims if d.param == KEEP]
        kept = [k for k in keys if round(values[k])]
        moves = [[k] for k in keys] + [[a, b] for a in kept for b in keys if b not in kept]
        seen = {tuple(self.path(values))}
        out = []
        for move in moves:
            point = {**values, **{k: 1.0 - round(values[k]) for k in move}}
            path = tuple(self.path(point))
            if path not in seen:
                seen.add(path)
                out.append(point)
        return out

    def start_point(self) -> dict[str, float]:
        return self.point(self.start)

    def source_path(self, ref: str, layers: int) -> list[tuple[str, int]]:
        return [(ref, layer) for layer in range(layers)]

    def recipe(self, values: dict[str, Any], names: dict[str, str] | None = None) -> dict[str, Any]:
        return path_recipe(self.path(values), self.dtype, names)


def _ref_of(name: str, sources: list[str], where: str) -> str:
    labels = model_labels(sources)
    if name in sources:
        return name
    by_label = {label: ref for ref, label in labels.items()}
    if name in by_label:
        return by_label[name]
    raise EvomergeError(f"{where}.model: {name!r} is not a source of the layer path "
                        f"(sources: {', '.join(labels.values())})")


def _layers_of(ranges: list[LayerRange], sources: list[str], layer_counts: dict[str, int],
               where: str) -> list[tuple[str, int]]:
    out = []
    for i, r in enumerate(ranges):
        ref = _ref_of(r.model, sources, f"{where}[{i}]")
        start, end = r.layer_range
        if end > layer_counts[ref]:
            raise EvomergeError(f"{where}[{i}].layer_range: {list(r.layer_range)}, but {r.model} has "
                                f"{layer_counts[ref]} layers (0–{layer_counts[ref] - 1})")
        out += [(ref, layer) for layer in range(start, end)]
    return out


def routing_sources(config: SearchConfig) -> list[str]:
    return list(config.routing.sources or config.models)


def routing_space(config: SearchConfig, layer_counts: dict[str, int]) -> RoutingSpace:
    """The space of ``config.routing`` over sources with ``layer_counts`` layers; bad slots, bounds or start
    are one line naming the field."""
    spec = config.routing
    sources = routing_sources(config)
    if spec.slots is not None:
        slots = _layers_of(spec.slots, sources, layer_counts, "routing.slots") * spec.repeats
    else:
        slots = [(ref, layer) for _ in range(spec.repeats) for ref in sources for layer in range(layer_counts[ref])]
    max_layers = spec.max_layers if spec.max_layers is not None else len(slots)
    if max_layers > len(slots):
        raise EvomergeError(f"routing.max_layers: {max_layers}, but there are {len(slots)} candidate slots")
    if spec.min_layers > len(slots):
        raise EvomergeError(f"routing.min_layers: {spec.min_layers}, but there are {len(slots)} candidate slots")
    scale = (spec.scale.low, spec.scale.high) if spec.scale is not None else None
    space = RoutingSpace(sources, slots, spec.min_layers, max_layers, scale, [], config.dtype)
    if spec.start is not None:
        start = _layers_of(spec.start, sources, layer_counts, "routing.start")
        if not spec.min_layers <= len(start) <= max_layers:
            raise EvomergeError(f"routing.start: a path of {len(start)} layers, outside min_layers..max_layers "
                                f"({spec.min_layers}..{max_layers})")
        if space.point(start) is None:
            raise EvomergeError("routing.start: not a path through the candidate slots in their order "
                                "(each slot once, in the order of routing.slots)")
    else:
        own = space.source_path(sources[0], layer_counts[sources[0]])
        start = own if space.point(own) is not None else [(s.model, s.layer) for s in space.path(
            {d.key: 1.0 if d.param == KEEP and d.block < len(own) else 0.0 for d in space.dims})]
    return RoutingSpace(sources, slots, spec.min_layers, max_layers, scale, start, config.dtype)


def stage_config(config: SearchConfig, merge_dir: Path) -> SearchConfig:
    """The layer-path stage of a PS + DFS config: a search of its own beside the parameter search's, in the
    same storage, whose sources are the listed ones with ``merge`` the parameter search's best merge."""
    spec = config.routing
    sources = [str(merge_dir) if s == MERGE_SOURCE else s for s in routing_sources(config)]

    def renamed(ranges):
        if ranges is None:
            return None
        return [{"model": str(merge_dir) if r.model == MERGE_SOURCE else r.model, "layer_range": list(r.layer_range)}
                for r in ranges]

    routing = {**spec.model_dump(), "sources": None, "slots": renamed(spec.slots), "start": renamed(spec.start),
               "n_trials": None, "sampler": None}
    data = {**config.model_dump(), "models": sources, "method": config.methods[0], "parameters": {}, "fixed": {},
            "routing": routing,
            "n_trials": spec.n_trials or config.n_trials, "sampler": spec.sampler,
            "output_dir": str(config.run_dir / STAGE_DIR), "storage": config.storage_url,
            "study_name": config.study + STAGE_SUFFIX}
    return SearchConfig.model_validate(data)
