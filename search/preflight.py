"""Everything a search can know is wrong before it creates or touches a study.

``evomerge validate`` runs exactly these checks and ``evomerge search`` runs them before opening its
storage, so a config that validates cannot fail later for a reason a check here could have found: the
device, the run directory, the storage URL, the models (readable, distinct, of one shape), the method's
input limits, the hand-written recipe and the recipes at both ends of every searched range (planned, not
merged), and the tasks and their metrics. Each failure is one ``EvomergeError`` line naming the field.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_core.adapters import SourceOpener, is_adapter, resolve_source, split_ref
from merge_core.architecture import count_layers
from merge_core.checkpoint import check_writable_dir, resolve_model_path
from merge_core.errors import EvomergeError
from merge_core.memory import MemoryPlan, check_memory, plan_memory
from merge_core.methods import check_inputs, get_method
from merge_core.plan import Source, plan_merge
from merge_core.recipe import load_recipe
from merge_core.routing import check_same_shape
from merge_core.runtime import DTYPES, check_device
from search.config import EVERY_TASK, MERGE_SOURCE, SearchConfig
from search.routing import routing_sources, routing_space
from search.space import METHOD_KEY, Dimension, build_recipe, dimensions, dims_for, handwritten_point, model_labels


@dataclass
class Preflight:
    """What the checks read, kept so the search does not read it twice."""

    paths: dict[str, str]
    num_layers: int
    dims: list[Dimension]
    tensors: int
    evaluator: Any
    memory: MemoryPlan | None = None


def sqlite_file(url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite"):
        return None
    return Path(parsed.database) if parsed.database and parsed.database != ":memory:" else None


def check_storage(config: SearchConfig) -> None:
    """The storage URL parses, its driver is installed, and the database is reachable and sound: an SQLite
    file is read through (``quick_check``, nothing written), another database is connected to once."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    url = config.storage_url
    field = "storage" if config.storage else "output_dir"
    try:
        parsed = make_url(url)
        engine = None if parsed.drivername.startswith("sqlite") else create_engine(url)
    except (ArgumentError, ValueError) as exc:
        raise EvomergeError(f"storage: {url!r} is not a database URL ({str(exc).splitlines()[0]})") from None
    except ModuleNotFoundError as exc:
        raise EvomergeError(f"storage: {url}: its database driver is not installed ({exc.name})") from None
    except Exception as exc:  # a dialect sqlalchemy does not know
        raise EvomergeError(f"storage: {url}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if engine is not None:
        try:
            with engine.connect():
                pass
        except Exception as exc:
            raise EvomergeError(f"storage: {url}: cannot connect ({root_cause(exc)})") from None
        finally:
            engine.dispose()
        return
    path = sqlite_file(url)
    if path is None:
        raise EvomergeError(f"storage: {url}: an in-memory database cannot hold a study (give a file)")
    if not path.exists():
        check_writable_dir(path.parent, f"{field}:")
        return
    if not path.is_file():
        raise EvomergeError(f"{field}: {path} is not a file")
    check_writable_dir(path.parent, f"{field}:")
    # Read as immutable: no lock taken, no -wal/-shm file made or removed, so a worker or a killed
    # worker's database is never disturbed (only the main file is checked; the WAL is the storage's).
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
        try:
            result = db.execute("PRAGMA quick_check").fetchone()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise EvomergeError(f"storage: {path} is not a sound SQLite database ({exc})") from None
    if result is None or result[0] != "ok":
        raise EvomergeError(f"storage: {path} is a damaged SQLite database ({result[0] if result else 'empty'})")


def root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_base_is_a_model(config: SearchConfig, path: str) -> None:
    """The live model is built from the base_model's directory, so it cannot be an adapter (the models
    merged onto it can)."""
    if split_ref(path)[1] is not None or is_adapter(Path(path)):
        raise EvomergeError(f"base_model: {config.base_model} is a LoRA adapter; the base_model must be a "
                            f"model directory (list adapters under models)")


def check_models(config: SearchConfig, paths: dict[str, str], readers: dict[str, Source]) -> int:
    """Distinct models of one shape: every source has the base's layers and tensor shapes, since its
    weights go into a live model built from the base. Returns the number of layers."""
    methods = [get_method(m) for m in config.methods]
    refs = [config.base_model, *config.models]
    seen: dict[str, str] = {}
    for ref in refs:
        where = "base_model" if ref == config.base_model else "models"
        if paths[ref] in seen and ref != seen[paths[ref]]:
            raise EvomergeError(f"{where}: {ref} and {seen[paths[ref]]} are the same model ({paths[ref]})")
        seen.setdefault(paths[ref], ref)
    if all(m.base_is_input for m in methods):
        pass  # the base is only the live model's template here: listing it among the models is a choice
    elif paths[config.base_model] in {paths[m] for m in config.models}:
        raise EvomergeError(f"models: {config.base_model} is the base_model; list only the models merged onto it")
    base = readers[config.base_model]
    num_layers = count_layers(base.names, base.config, config.base_model)
    base_shapes = {name: tuple(base.shape(name)) for name in base.names}
    for ref in config.models:
        reader = readers[ref]
        layers = count_layers(reader.names, reader.config, ref)
        if layers != num_layers:
            raise EvomergeError(f"models: {ref} has {layers} layers, the base_model {num_layers}")
        for name in reader.names:
            if name in base_shapes and tuple(reader.shape(name)) != base_shapes[name]:
                raise EvomergeError(f"models: {ref}: tensor {name} is {list(reader.shape(name))} but "
                                    f"{list(base_shapes[name])} in the base_model (the models differ in size)")
    for i, method in enumerate(methods):
        uses_base = not method.base_is_input
        n_inputs = len(config.models) + (1 if uses_base else 0)
        try:
            check_inputs(method, n_inputs, uses_base)
        except EvomergeError as exc:
            given = f"the base_model and {len(config.models)} models" if uses_base else f"{len(config.models)} models"
            where = "models" if len(methods) == 1 else f"method[{i}]: {method.name}"
            raise EvomergeError(f"{where}: {exc} ({given})") from None
    return num_layers


def _corners(config: SearchConfig, dims: list[Dimension], start: dict[str, float]):
    """(label, point): each searched parameter at its low and its high, the others at the hand-written
    start, then every parameter at its low and every one at its high. A limit on a parameter's values
    (density in (0, 1]…) is an interval, so these points reach whatever a trial could."""
    keep = {k: v for k, v in start.items() if k == METHOD_KEY}
    for param, spec in config.parameters.items():
        for end in ("low", "high"):
            value = getattr(spec, end)
            yield f"parameters.{param}: {end} {value}", {**start, **{d.key: value for d in dims if d.param == param}}
    if len(config.parameters) > 1:
        for end in ("low", "high"):
            ends = {d.key: getattr(config.parameters[d.param], end) for d in dims}
            yield f"parameters: every {end}", {**keep, **ends}


def check_groups(config: SearchConfig, names: list[str]) -> None:
    """A group (a tensor-name substring, as mergekit filters) that matches no tensor would be a dimension
    the sampler moves without any effect."""
    for param, spec in config.parameters.items():
        if spec.granularity != "groups":
            continue
        for group in spec.groups:
            if group != "*" and not any(group in name for name in names):
                raise EvomergeError(f"parameters.{param}.groups: {group!r} matches no tensor name of the base_model")


def check_recipes(config: SearchConfig, dims: list[Dimension], num_layers: int, readers) -> int:
    """Plan (never merge) the hand-written recipe and the corners of the space. Returns its tensor count."""
    check_groups(config, readers[config.base_model].names)
    tensors = 0
    for method in config.methods:
        start = handwritten_point(config, dims, method)
        within = dims_for(dims, method)
        prefix = f"method {method}: " if len(config.methods) > 1 else ""
        try:
            plan = plan_merge(load_recipe(build_recipe(config, dims, start, num_layers), strict=True), readers)
        except EvomergeError as exc:
            raise EvomergeError(f"{prefix}the hand-written recipe: {exc}") from None
        tensors = max(tensors, len(plan.jobs))
        for label, point in _corners(config, within, start):
            try:
                plan_merge(load_recipe(build_recipe(config, dims, point, num_layers), strict=True), readers)
            except EvomergeError as exc:
                raise EvomergeError(f"{prefix}{label}: {exc}") from None
    return tensors


def _routing_shapes(where: dict[str, str], readers: dict[str, Source]) -> dict[str, int]:
    """Sources of one layer path share an architecture and widths (their layer counts may differ): one line
    naming the source and the key that differ. Returns each source's layer count."""
    check_same_shape({ref: readers[ref].config for ref in where}, where)
    return {ref: count_layers(readers[ref].names, readers[ref].config, ref) for ref in where}


def check_routing(config: SearchConfig, paths: dict[str, str], readers) -> tuple[int, list[Dimension], int]:
    """A layer-path search alone: distinct sources of one shape, the space's slots, bounds and start, and
    the start path's recipe planned. Returns (the base's layers, the dimensions, the recipe's tensors)."""
    seen: dict[str, str] = {}
    for ref in config.models:
        if paths[ref] in seen:
            raise EvomergeError(f"models: {ref} and {seen[paths[ref]]} are the same model ({paths[ref]})")
        seen[paths[ref]] = ref
    refs = {config.base_model: "base_model", **{ref: "models" for ref in config.models}}
    counts = _routing_shapes(refs, readers)
    for i, ref in enumerate(routing_sources(config)):
        if ref not in readers:
            raise EvomergeError(f"routing.sources[{i}]: {ref!r} is not one of models")
    space = routing_space(config, counts)
    plan = plan_merge(load_recipe(space.recipe(space.start_point()), strict=True), readers)
    return counts[config.base_model], space.dims, len(plan.jobs)


def check_routing_stage(config: SearchConfig, paths: dict[str, str], readers, num_layers: int,
                        config_dir: Path | None) -> None:
    """The layer-path stage after a parameter search: its sources other than the merge (which has the base's
    shape) readable and of the base's shape, and its space with the merge's layer count."""
    opener = SourceOpener()
    refs: dict[str, str] = {config.base_model: "base_model"}
    counts = {MERGE_SOURCE: num_layers}
    for i, ref in enumerate(routing_sources(config)):
        if ref == MERGE_SOURCE:
            continue
        if ref not in readers:
            readers = {**readers, ref: opener.open(resolve_source(ref, config_dir), paths[config.base_model])}
        refs[ref] = f"routing.sources[{i}]"
    counts |= _routing_shapes(refs, readers)
    routing_space(config, counts)


def check_live_model(config: SearchConfig, path: str) -> None:
    """The base is also the live model and its tokenizer: transformers must know its architecture and
    load its tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    for what, load in (("config", AutoConfig.from_pretrained), ("tokenizer", AutoTokenizer.from_pretrained)):
        try:
            load(path)
        except Exception as exc:
            raise EvomergeError(f"base_model: {config.base_model}: transformers cannot load its {what} "
                                f"({type(exc).__name__}: {root_cause(exc)})") from None


def build_evaluator(config: SearchConfig, split: str = "search"):
    """The evaluator every candidate of this config is scored with (``split``: the tasks' split): lm-eval for
    the tasks, plus each held-out perplexity text (its ``test_text`` on the test split)."""
    from evaluators import CombinedEvaluator, LmEvalEvaluator, PerplexityEvaluator

    texts = {p.name: p for p in config.perplexity}
    names = [t.name for t in config.tasks if t.name not in texts]
    limits = {t.name: t.limit for t in config.tasks if t.limit is not None and t.name in names}
    model_args = {k: v for k, v in config.model_args.items() if k != "dtype"}  # dtype: the live model's, checked
    lm = (LmEvalEvaluator(names, include_path=config.include_path, split=split, limit=config.limit,
                          num_fewshot=config.num_fewshot, batch_size=config.batch_size, device=config.device,
                          threads=config.threads, apply_chat_template=config.apply_chat_template,
                          fewshot_as_multiturn=config.fewshot_as_multiturn,
                          system_instruction=config.system_instruction, gen_kwargs=config.gen_kwargs,
                          limits=limits, model_args=model_args, backend=config.evaluator,
                          engine={"pretrained": str(resolve_model_path(config.base_model)), "dtype": config.dtype,
                                  "seed": config.seed} if config.evaluator == "vllm" else None)
          if names else None)
    if not texts:
        return lm
    held_out = [PerplexityEvaluator((p.test_text or p.text) if split == "test" else p.text, max_tokens=p.max_tokens,
                                    context_length=p.context_length, batch_size=min(config.batch_size, 8),
                                    device=config.device, task_name=p.name) for p in texts.values()]
    return CombinedEvaluator(([lm] if lm else []) + held_out)


def build_checked_evaluator(config: SearchConfig) -> Any:
    try:
        return build_evaluator(config)
    except EvomergeError:
        raise
    except Exception as exc:  # lm-eval refusing a task YAML
        names = ", ".join(t.name for t in config.tasks)
        raise EvomergeError(f"tasks: {names}: {type(exc).__name__}: {root_cause(exc)}") from None


def check_tasks(config: SearchConfig, evaluator: Any) -> None:
    """Every task is scored under its own name and gives the metric the config averages."""
    produced = getattr(evaluator, "metric_names", None)
    if produced is None:
        return  # an evaluator that cannot say beforehand: its first score (a baseline) checks
    for i, task in enumerate(config.tasks):
        if task.name not in produced:
            raise EvomergeError(f"tasks[{i}].name: {task.name!r} is not scored under that name "
                                f"(scored: {', '.join(produced)}); list a group's tasks one by one")
        if task.metric and task.metric not in produced[task.name]:
            raise EvomergeError(f"tasks[{i}].metric: task {task.name!r} does not produce metric {task.metric!r} "
                                f"(it produces: {', '.join(produced[task.name])})")


def check_objective(config: SearchConfig, evaluator: Any) -> None:
    """Every metric the objectives and the constraints read exists and can enter them, checked from the tasks'
    definitions before any model is scored (``validate`` and ``search`` alike). On the raw scale a
    lower-is-better metric averages with others only through a probability form (perplexities, bits per
    byte); alone in its objective any direction serves, and on the relative scale every metric does.
    Evaluators that cannot say their metrics before scoring (``metric_directions``) are checked on the first
    scores instead."""
    from evaluators.base import check_objective_metric

    directions = getattr(evaluator, "metric_directions", None)
    if directions is None:
        return
    known = directions()
    chosen: dict[str, tuple[str, bool]] = {}
    for i, task in enumerate(config.tasks):
        if task.name not in known:
            continue  # a group name: its member tasks are what the evaluator scores
        metrics = known[task.name]
        metric = task.metric or next(iter(metrics))
        if metric not in metrics:
            raise EvomergeError(f"tasks[{i}].metric: task {task.name!r} has no metric "
                                f"{metric!r} (it has: {', '.join(metrics)})")
        chosen[task.name] = (metric, metrics[metric])
    for p in config.perplexity:
        if p.name in known and p.name not in chosen:
            chosen[p.name] = ("perplexity", False)
    if config.objective_scale == "raw":
        groups = [("the average of tasks", [t.name for t in config.tasks])]
        if config.objectives:
            groups += [(f"objective {name!r}", tasks) for name, tasks in config.objective_groups]
        for where, tasks in groups:
            for task in tasks:
                if task in chosen and len(tasks) > 1:
                    try:
                        check_objective_metric(task, *chosen[task])
                    except EvomergeError as exc:
                        raise EvomergeError(f"{where}: {exc} (or set objective_scale: relative)") from None
    labels = set(model_labels(config.models).values())
    for i, c in enumerate(config.constraints):
        tasks = [t.name for t in config.tasks] if c.task == EVERY_TASK else [c.task]
        for task in tasks:
            if task in known and c.metric and c.metric not in known[task]:
                raise EvomergeError(f"constraints[{i}].metric: task {task!r} has no metric {c.metric!r} "
                                    f"(it has: {', '.join(known[task])})")
        if isinstance(c.no_worse_than, str) and c.no_worse_than not in {"base", "best_source", *labels}:
            raise EvomergeError(f"constraints[{i}].no_worse_than: {c.no_worse_than!r} is not base, best_source, "
                                f"a source's label ({', '.join(sorted(labels))}) or a number")


def check_texts(config: SearchConfig) -> None:
    """Each held-out perplexity text exists and is a file, before anything is loaded."""
    for i, p in enumerate(config.perplexity):
        for field in ("text", "test_text"):
            value = getattr(p, field)
            if value is not None and not Path(value).is_file():
                raise EvomergeError(f"perplexity[{i}].{field}: {value} is not a file")


def check_fidelity(config: SearchConfig, evaluator: Any) -> None:
    """Multi-fidelity needs an evaluator that scores document subsets, and rungs the search split can fill: a
    rung of at least every task's documents is the full evaluation already, and the ones after it cost nothing."""
    if config.fidelity is None:
        return
    if not (hasattr(evaluator, "score_rungs") and hasattr(evaluator, "document_counts")):
        raise EvomergeError(f"fidelity: the evaluator ({type(evaluator).__name__}) cannot score subsets of "
                            "the documents (it has no score_rungs/document_counts)")
    counts = evaluator.document_counts()
    largest = max(counts, key=counts.get)
    for i, rung in enumerate(config.fidelity.rungs):
        if rung != "all" and rung >= counts[largest]:
            raise EvomergeError(f"fidelity.rungs[{i}]: {rung} documents per task, but the largest task "
                                f"({largest}) has {counts[largest]} in the search split (use 'all' for the last rung)")


def preflight(config: SearchConfig, config_dir: Path | None = None, evaluator: Any = None) -> Preflight:
    """All checks, cheapest first; ``evaluator`` (else one built from the config) is checked and kept."""
    check_device(config.device, "device:")
    check_writable_dir(config.run_dir, "output_dir:")
    check_storage(config)
    paths = {ref: resolve_source(ref, config_dir) for ref in [config.base_model, *config.models]}
    check_base_is_a_model(config, paths[config.base_model])
    opener = SourceOpener()
    readers = {ref: opener.open(path, paths[config.base_model]) for ref, path in paths.items()}
    if config.routing_only:
        num_layers, dims, tensors = check_routing(config, paths, readers)
    else:
        num_layers = check_models(config, paths, readers)
        dims = dimensions(config, num_layers)
        tensors = check_recipes(config, dims, num_layers, readers)
        if config.routing is not None:
            check_routing_stage(config, paths, readers, num_layers, config_dir)
    check_live_model(config, paths[config.base_model])
    memory = plan_memory(readers, config.base_model, DTYPES[config.dtype])
    if config.device == "cpu":  # on a GPU the sources and the live model are copied to its memory
        check_memory(memory, config.dtype)
    check_texts(config)
    evaluator = evaluator or build_checked_evaluator(config)
    check_tasks(config, evaluator)
    check_objective(config, evaluator)
    check_fidelity(config, evaluator)
    return Preflight(paths, num_layers, dims, tensors, evaluator, memory)
