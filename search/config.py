"""The search config (YAML → pydantic): models, method, search space, tasks, sampler, budget, storage."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from merge_core.errors import EvomergeError
from merge_core.methods import REQUIRED, get_method
from merge_core.plan import DEFAULT_MODEL_PARAMS
from merge_core.recipe import StrictModel, describe_validation_error, read_yaml_mapping, validate

# A device the merge and the evaluator both accept: ``cpu``, ``cuda`` or ``cuda:N``.
DEVICE = re.compile(r"cpu|cuda(:\d+)?")


class SearchedParameter(StrictModel):
    """Bounds of one merge parameter and how finely it varies across the model.

    ``granularity``: ``global`` (one value), ``groups`` (one value per tensor-name filter group of
    ``groups``, plus the rest), ``blocks`` (one value per block of ``block_size`` layers) or ``curve``
    (``points`` control points interpolated over depth, like a mergekit gradient).
    """

    low: float = Field(allow_inf_nan=False)
    high: float = Field(allow_inf_nan=False)
    granularity: Literal["global", "groups", "blocks", "curve"] = "global"
    points: int = Field(default=3, ge=2, le=16)
    groups: list[str] = Field(default_factory=lambda: ["self_attn", "mlp"])

    @field_validator("groups")
    @classmethod
    def _distinct_groups(cls, groups: list[str]) -> list[str]:
        """Each group is one dimension named after it; ``rest`` is the dimension of the other tensors."""
        for g in groups:
            if not g or g == "rest" or groups.count(g) > 1:
                raise ValueError(f"group {g!r} is empty, reserved (rest) or listed twice")
        return groups

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class TaskSpec(StrictModel):
    name: str = Field(min_length=1)
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    metric: str | None = Field(default=None, min_length=1)
    limit: int | float | None = Field(default=None, gt=0, allow_inf_nan=False)  # over the config's limit

    @field_validator("limit")
    @classmethod
    def _documents_or_fraction(cls, limit):
        if limit is not None and limit >= 1 and limit != int(limit):
            raise ValueError(f"{limit}: a whole number of documents, or a fraction below 1")
        return limit


SAMPLERS = ("cmaes", "cmaes_ipop", "cmaes_bipop", "tpe", "gp", "nsga2", "random")
# Samplers of one continuous space and one objective: no categorical method, no Pareto front, no constraints.
CMAES_SAMPLERS = ("cmaes", "cmaes_ipop", "cmaes_bipop")
SCALES = ("raw", "relative")
EVERY_TASK = "every"
PRUNERS = ("successive_halving", "hyperband")


class ObjectiveSpec(StrictModel):
    """One objective of a multi-objective search: the weighted average (by the tasks' weights) of its tasks."""

    name: str = Field(min_length=1)
    tasks: list[str] = Field(min_length=1)


class ConstraintSpec(StrictModel):
    """A bound a merge must keep on one task's metric, or on every task of ``tasks`` (``task: every``): no worse
    than ``no_worse_than`` (``base``, ``best_source``, a source's label, or a number) in the metric's own
    direction, with slack: ``tolerance`` in the metric's units, ``ratio`` as a factor (for a lower-is-better
    metric the bound is reference × ratio + tolerance, for a higher-is-better one reference / ratio − tolerance)."""

    task: str = Field(min_length=1)
    metric: str | None = Field(default=None, min_length=1)
    no_worse_than: float | str = Field(union_mode="left_to_right")
    tolerance: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    ratio: float = Field(default=1.0, ge=1, allow_inf_nan=False)

    @field_validator("no_worse_than")
    @classmethod
    def _finite(cls, value: float | str) -> float | str:
        if isinstance(value, float) and value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{value} is not a finite number")
        if isinstance(value, str) and not value:
            raise ValueError("give base, best_source, a source's label or a number")
        return value


class PerplexityText(StrictModel):
    """A held-out text scored as a task named ``name`` (metrics ``perplexity``, lower is better, and ``nll``):
    ``text`` on the search split, ``test_text`` (default: the same text) on the test split."""

    name: str = Field(min_length=1)
    text: str = Field(min_length=1)
    test_text: str | None = Field(default=None, min_length=1)
    max_tokens: int = Field(default=4096, ge=2)
    context_length: int = Field(default=256, ge=2)


class Fidelity(StrictModel):
    """Multi-fidelity: each candidate is scored on growing, nested subsets of the search split's documents
    (``rungs``: documents per task, the last one ``all``), and after each rung but the last a pruner may stop
    it (successive halving keeps about the best 1/``reduction_factor`` of the candidates at each rung;
    hyperband runs several such brackets with different starting rungs)."""

    rungs: list[int | Literal["all"]] = Field(min_length=2)
    pruner: Literal[PRUNERS] = "successive_halving"
    reduction_factor: int = Field(default=3, ge=2)

    @field_validator("rungs")
    @classmethod
    def _growing(cls, rungs: list[int | str]) -> list[int | str]:
        sizes = [r for r in rungs if r != "all"]
        if "all" in rungs[:-1] or any(isinstance(r, bool) for r in rungs):
            raise ValueError(f"{rungs}: rungs are numbers of documents per task; only the last may be 'all'")
        if any(r < 1 for r in sizes) or any(b <= a for a, b in zip(sizes, sizes[1:])):
            raise ValueError(f"{rungs}: rungs must be positive and strictly increasing")
        return rungs

    @property
    def sizes(self) -> list[int | None]:
        """The rungs as ``score_rungs`` takes them (None: all documents)."""
        return [None if r == "all" else r for r in self.rungs]


# In ``routing.sources``: the parameter search's best merge (a PS + DFS search runs the parameter search first).
MERGE_SOURCE = "merge"


class LayerRange(StrictModel):
    """Layers ``layer_range`` = [start, end) of one model (a source's path or label), as in mergekit's slices."""

    model: str = Field(min_length=1)
    layer_range: tuple[int, int]

    @model_validator(mode="after")
    def _ordered(self):
        start, end = self.layer_range
        if not 0 <= start < end:
            raise ValueError(f"layer_range {list(self.layer_range)}: need 0 <= start < end")
        return self


class ScaleRange(StrictModel):
    """Bounds of each slot's scale on what its layer adds to the residual stream."""

    low: float = Field(gt=0, allow_inf_nan=False)
    high: float = Field(gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if not self.low <= 1 <= self.high:
            raise ValueError(f"[{self.low}, {self.high}] must hold 1 (a layer as it is)")
        return self


class RoutingSpec(StrictModel):
    """A layer-path search (Sakana's data-flow space): the candidate slots are ``slots`` (default: every layer
    of each of ``sources`` in order, the whole sequence ``repeats`` times), each slot kept or not and, with
    ``scale``, scaled; a path keeps between ``min_layers`` and ``max_layers`` slots. ``start`` is the first
    path scored (default: the first source's own layers). With ``parameters`` the parameter search runs first
    and ``merge`` in ``sources`` is its best merge; ``n_trials`` and ``sampler`` then are this stage's."""

    sources: list[str] | None = Field(default=None, min_length=1)  # default: models
    repeats: int = Field(default=1, ge=1, le=8)
    slots: list[LayerRange] | None = Field(default=None, min_length=1)
    min_layers: int = Field(default=1, ge=1)
    max_layers: int | None = Field(default=None, ge=1)
    scale: ScaleRange | None = None
    start: list[LayerRange] | None = Field(default=None, min_length=1)
    n_trials: int | None = Field(default=None, ge=1)
    sampler: str | None = None

    @field_validator("sources")
    @classmethod
    def _distinct(cls, sources: list[str] | None) -> list[str] | None:
        if sources is not None and len(set(sources)) != len(sources):
            raise ValueError(f"{next(s for s in sources if sources.count(s) > 1)!r} is listed twice")
        return sources

    @model_validator(mode="after")
    def _bounds(self):
        if self.max_layers is not None and self.max_layers < self.min_layers:
            raise ValueError(f"max_layers ({self.max_layers}) is below min_layers ({self.min_layers})")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ValueError(f"sampler: {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if self.start is not None and self.max_layers is not None:
            length = sum(r.layer_range[1] - r.layer_range[0] for r in self.start)
            if not self.min_layers <= length <= self.max_layers:
                raise ValueError(f"start: a path of {length} layers, outside min_layers..max_layers "
                                 f"({self.min_layers}..{self.max_layers})")
        return self


def default_storage_url(run_dir: Path) -> str:
    """Where a run keeps its study unless ``storage`` says otherwise: SQLite beside the run's outputs."""
    return f"sqlite:///{(run_dir / 'study.db').as_posix()}"


class SearchConfig(StrictModel):
    """Everything ``evomerge search`` needs; see the README's search config reference."""

    name: str = Field(default="search", min_length=1)
    base_model: str
    models: list[str] = Field(min_length=1)
    method: str | list[str] = "ties"  # a list: the method is searched too (a categorical dimension)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    parameters: dict[str, SearchedParameter] = Field(default_factory=dict)
    fixed: dict[str, float | bool | str] = Field(default_factory=dict)
    block_size: int = Field(default=4, ge=1)
    tasks: list[TaskSpec] = Field(min_length=1)
    perplexity: list[PerplexityText] = Field(default_factory=list)
    objective_scale: Literal[SCALES] = "raw"
    objectives: list[str | ObjectiveSpec] | None = None
    constraints: list[ConstraintSpec] = Field(default_factory=list)
    include_path: str | None = "configs/tasks"
    limit: int | None = Field(default=None, ge=1)
    num_fewshot: int | None = Field(default=None, ge=0)
    # lm-eval's options, passed to it unchanged (see the README); generation stays greedy
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool | None = None  # default: as apply_chat_template
    system_instruction: str | None = None
    gen_kwargs: dict[str, Any] = Field(default_factory=dict)
    model_args: dict[str, Any] = Field(default_factory=dict)
    evaluator: Literal["hf", "vllm"] = "hf"  # vllm: one engine on the GPU, each candidate's weights pushed into it
    batch_size: int = Field(default=64, ge=1)
    sampler: Literal[SAMPLERS] | None = None  # None: cmaes, or tpe where cmaes cannot serve (see ``sampler_name``)
    fidelity: Fidelity | None = None
    # points the sampler learns first: the hand-written recipe (a trial, scored) and each source model where
    # it is a point of the space (told with its baseline score, at no cost)
    warm_start: list[Literal["handwritten", "sources"]] = Field(default_factory=lambda: ["handwritten"])
    n_trials: int | None = Field(default=60, ge=1)
    timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_items: int | None = Field(default=None, ge=1)  # budget in item-evaluations (documents scored, all tasks)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)  # the samplers' NumPy seeds
    storage: str | None = Field(default=None, min_length=1)
    study_name: str | None = Field(default=None, min_length=1)
    heartbeat_seconds: int = Field(default=10, ge=1)
    grace_seconds: int = Field(default=40, ge=1)
    output_dir: str | None = Field(default=None, min_length=1)
    device: str = "cpu"
    threads: int | None = Field(default=None, ge=1)
    routing: RoutingSpec | None = None  # a layer-path search (after the parameter search when there is one)

    @field_validator("name")
    @classmethod
    def _one_directory(cls, name: str) -> str:
        """The run directory is ``results/<name>``: the name must stay one directory below it."""
        if name in (".", "..") or any(c in name for c in "/\\\0"):
            raise ValueError(f"{name!r} must be usable as one directory name (no /, \\, . or ..)")
        return name

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not DEVICE.fullmatch(device):
            raise ValueError(f"use cpu, cuda or cuda:N, not {device!r}")
        return device

    @model_validator(mode="after")
    def _budget(self):
        if self.n_trials is None and self.timeout is None and self.max_items is None:
            raise ValueError("give a budget: n_trials, timeout, max_items, or several")
        if self.fidelity is not None and self.sampler_name == "gp":
            raise ValueError("fidelity: the gp sampler learns from complete trials only, so every pruned "
                             "candidate's evaluations would be lost; use cmaes, cmaes_ipop, cmaes_bipop, tpe or random")
        if len(set(self.models)) != len(self.models):
            raise ValueError("models: a model is listed twice")
        if self.grace_seconds <= self.heartbeat_seconds:
            raise ValueError(f"grace_seconds ({self.grace_seconds}) must exceed heartbeat_seconds "
                             f"({self.heartbeat_seconds}): a live worker would look dead between two beats")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: task {next(n for n in names if names.count(n) > 1)!r} is listed twice")
        texts = [p.name for p in self.perplexity]
        if len(set(texts)) != len(texts):
            raise ValueError(f"perplexity: {next(n for n in texts if texts.count(n) > 1)!r} is named twice")
        self._check_lm_eval_options()
        self._check_routing()
        self._check_objectives()
        self._check_sampler()
        return self

    def _check_lm_eval_options(self) -> None:
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("fewshot_as_multiturn needs apply_chat_template: true (the few-shot examples become "
                             "chat turns)")
        for key in ("do_sample", "temperature", "top_p", "top_k", "num_beams"):
            value = self.gen_kwargs.get(key)
            if key in self.gen_kwargs and value not in (False, 0, 0.0, 1, None) or (key == "do_sample" and value):
                raise ValueError(f"gen_kwargs.{key}: {value!r}: every model is scored greedily (the same answers "
                                 "for the same weights); set max_gen_toks or until only")
        dtype = self.model_args.get("dtype")
        if dtype is not None and str(dtype).removeprefix("torch.") != self.dtype:
            raise ValueError(f"model_args.dtype: {dtype!r}, but the live model is built in dtype: {self.dtype} "
                             "(set dtype instead)")
        if self.evaluator == "vllm" and not self.device.startswith("cuda"):
            raise ValueError(f"evaluator: vllm runs on CUDA; set device: cuda (it is {self.device})")
        if "revision" in self.model_args:
            raise ValueError("model_args.revision: name the revision with the model, NAME@REVISION, as mergekit does")

    def _check_routing(self) -> None:
        if self.routing is None:
            return
        sources = self.routing.sources or self.models
        if MERGE_SOURCE in sources and not self.parameters:
            raise ValueError(f"routing.sources: {MERGE_SOURCE!r} is the parameter search's best merge, and this "
                             "config searches no parameters (give parameters, or list models)")
        if self.evaluator == "vllm":
            raise ValueError("routing: a vLLM engine has a fixed number of layers, and layer paths change it; use "
                             "evaluator: hf")
        if self.routing.n_trials is not None and not self.parameters:
            raise ValueError("routing.n_trials: a layer-path search alone takes n_trials (this one is for the "
                             "stage after a parameter search)")

    def _check_objectives(self) -> None:
        scored = set(self.scored_tasks)
        groups = self.objective_groups
        seen: set[str] = set()
        for i, (name, tasks) in enumerate(groups):
            if name in seen:
                raise ValueError(f"objectives[{i}]: objective {name!r} is named twice")
            seen.add(name)
            for task in tasks:
                if task not in scored:
                    raise ValueError(f"objectives[{i}]: {task!r} is not a task of tasks or perplexity "
                                     f"(scored: {', '.join(self.scored_tasks)})")
        for i, c in enumerate(self.constraints):
            if c.task != EVERY_TASK and c.task not in scored:
                raise ValueError(f"constraints[{i}].task: {c.task!r} is not a task of tasks or perplexity "
                                 f"(scored: {', '.join(self.scored_tasks)}; or 'every')")
            if c.task == EVERY_TASK and c.metric is not None:
                raise ValueError(f"constraints[{i}].metric: 'every' task keeps its own metric (give one task to "
                                 f"bound {c.metric!r})")
        methods = self.methods
        if len(set(methods)) != len(methods) or not methods:
            raise ValueError(f"method: {methods} must list each method once, and at least one")

    def _check_sampler(self) -> None:
        """CMA-ES samples one continuous space with one objective and no constraints; what needs more gets
        tpe unless a sampler is named, and a named CMA-ES sampler is refused with the reason."""
        needs = ([f"{len(self.objective_groups)} objectives"] if self.multi_objective else []) + (
            ["constraints"] if self.constraints else []) + (["a method list"] if len(self.methods) > 1 else [])
        if needs and self.sampler in CMAES_SAMPLERS:
            raise ValueError(f"sampler: {self.sampler} cannot serve {' and '.join(needs)} (it samples one continuous "
                             "space for one objective); use tpe, nsga2, gp or random, or leave sampler out")
        if self.fidelity is not None and self.multi_objective:
            raise ValueError("fidelity: Optuna's pruners compare one objective, and this search has "
                             f"{len(self.objective_groups)}; drop fidelity or the objectives")
        if self.sampler == "nsga2" and self.fidelity is not None:
            raise ValueError("fidelity: nsga2 learns from complete trials only; use tpe or random")

    @property
    def methods(self) -> list[str]:
        """The merge methods searched: one, or each of the list (``method`` then is a dimension)."""
        return [self.method] if isinstance(self.method, str) else list(self.method)

    @property
    def sampler_name(self) -> str:
        """The sampler that runs: as named, else cmaes, or tpe where the search has several objectives,
        constraints or a method list (TPE takes all three; see the README's measurements); for layer paths
        nsga2 (tpe with fidelity, which nsga2 cannot use)."""
        if self.sampler is not None:
            return self.sampler
        if self.routing_only:  # measured on layer paths: README, "Layer paths"
            return "tpe" if self.fidelity is not None else "nsga2"
        return "tpe" if self.multi_objective or self.constraints or len(self.methods) > 1 else "cmaes"

    @property
    def scored_tasks(self) -> list[str]:
        """Every task a candidate is scored on: ``tasks`` (the average's), then held-out texts not among them."""
        names = [t.name for t in self.tasks]
        return names + [p.name for p in self.perplexity if p.name not in names]

    @property
    def objective_groups(self) -> list[tuple[str, list[str]]]:
        """(name, tasks) of each objective; one objective, the average of ``tasks``, when none are given."""
        if not self.objectives:
            return [("average", [t.name for t in self.tasks])]
        return [(o, [o]) if isinstance(o, str) else (o.name, list(o.tasks)) for o in self.objectives]

    @property
    def multi_objective(self) -> bool:
        return len(self.objective_groups) > 1

    @property
    def routing_only(self) -> bool:
        """A layer-path search alone: the candidates are paths through the sources' layers, nothing merged."""
        return self.routing is not None and not self.parameters

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"results/{self.name}")

    @property
    def storage_url(self) -> str:
        return self.storage or default_storage_url(self.run_dir)

    @property
    def study(self) -> str:
        return self.study_name or self.name


def check_method_parameters(config: SearchConfig) -> None:
    """Searched and fixed parameters must be parameters of the method (with a method list: of at least one
    listed method), and each method's required parameters must be searched or fixed."""
    if config.routing is not None and not config.parameters:
        return  # a layer-path search alone merges nothing: the method and its parameters are unused
    field = "method" if isinstance(config.method, str) else "method[{}]"
    methods = []
    for i, name in enumerate(config.methods):
        try:
            methods.append(get_method(name))
        except EvomergeError as exc:
            raise EvomergeError(f"{field.format(i)}: {str(exc).removeprefix('merge_method: ')}") from None
    known = {p for m in methods for p in (*m.model_params, *m.params)}
    listed = " or ".join(config.methods)
    for where, names in (("parameters", config.parameters), ("fixed", config.fixed)):
        for name in names:
            if name not in known:
                raise EvomergeError(f"{where}.{name}: {listed} has no parameter {name!r} "
                                    f"(it has: {', '.join(sorted(known))})")
    if not config.parameters:
        raise EvomergeError("parameters: nothing to search (give at least one parameter with low/high)")
    for method in methods:
        defaults = {**method.model_params, **method.params, **DEFAULT_MODEL_PARAMS.get(method.name, {})}
        for name, default in defaults.items():
            if default is REQUIRED and name not in config.parameters and name not in config.fixed:
                raise EvomergeError(f"parameters.{name}: {method.name} needs {name}: "
                                    f"search it (parameters) or fix it (fixed)")
        if len(methods) > 1 and not any(p in config.parameters for p in (*method.model_params, *method.params)):
            raise EvomergeError(f"method: {method.name} has none of the searched parameters "
                                f"({', '.join(config.parameters)}): every trial of it would be the same merge")
    for name in config.fixed:
        if name in config.parameters:
            raise EvomergeError(f"fixed.{name}: also searched under parameters (fix it or search it, not both)")


# Command-line flags of ``evomerge search``/``validate`` and the config fields they override.
FLAG_FIELDS = {"--storage": "storage", "--study-name": "study_name", "--n-trials": "n_trials",
               "--timeout": "timeout", "--max-items": "max_items", "--device": "device"}


def with_overrides(config: SearchConfig, flags: dict[str, object], where: str = "command line") -> SearchConfig:
    """``config`` with the given ``{flag: value}`` overrides, validated like the YAML: a bad value is one
    line naming the flag (``--n-trials: ...``); None leaves the field as the config has it."""
    updates = {FLAG_FIELDS[flag]: value for flag, value in flags.items() if value is not None}
    if not updates:
        return config
    try:
        merged = SearchConfig.model_validate({**config.model_dump(), **updates})
    except ValidationError as exc:
        field = str(exc.errors()[0]["loc"][0]) if exc.errors()[0]["loc"] else ""
        flag = next((f for f, name in FLAG_FIELDS.items() if name == field and name in updates), None)
        message = describe_validation_error(exc)
        if flag:
            raise EvomergeError(f"{flag}: {message.removeprefix(field + ': ')}") from None
        raise EvomergeError(f"{where}: {message}") from None
    check_method_parameters(merged)
    return merged


def load_search_config(path: str | Path) -> SearchConfig:
    data = read_yaml_mapping(path, "search config")
    config = validate(SearchConfig, data, str(path))
    check_method_parameters(config)
    return config
