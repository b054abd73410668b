"""mergekit-evolve configs read as evomerge searches.

A mergekit-evolve config (``genome:`` + ``tasks:``) describes a CMA-ES search over per-model merge weights
(and TIES densities) in blocks of layers, tensor-name groups or smooth curves over depth: the same search
spaces ``search.config`` expresses with ``granularity``. ``convert`` maps one onto the other, so a user
switching from mergekit-evolve can keep their config; everything the two cannot share is either refused
(a search that would differ in what it finds) or named in a warning (a setting that only changes how
mergekit-evolve runs, not what it searches).

The semantics follow mergekit-evolve's genome (mergekit 0.1.5, ``mergekit/evo/genome.py``): its genotype
has one value per (layer group, model, filter group + rest, method parameter); weights are taken as
absolute values unless ``allow_negative_weights``, densities clamped to [0, 1]; ``normalize`` defaults to
true for linear, ties and dare_ties; ``smooth`` writes each parameter's layer-group values as a mergekit
gradient; slerp keeps, per layer group, the two models of highest value and interpolates by their softmax.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from merge_core.architecture import layer_count_key
from merge_core.checkpoint import resolve_model_path
from merge_core.errors import EvomergeError
from merge_core.recipe import StrictModel, read_yaml_mapping, validate
from search.config import SearchConfig, check_method_parameters

# The merge methods mergekit-evolve searches and the genome's parameters of each.
METHOD_PARAMETERS = {"linear": ("weight",), "task_arithmetic": ("weight",), "ties": ("weight", "density"),
                     "dare_ties": ("weight", "density"), "slerp": ("t",)}
NEEDS_BASE = frozenset({"ties", "dare_ties", "task_arithmetic"})
NORMALIZED_BY_DEFAULT = frozenset({"linear", "ties", "dare_ties"})  # mergekit-evolve's normalize when unset
DEFAULT_METRIC = "acc,none"
DEFAULT_MAX_FEVALS = 100  # mergekit-evolve's --max-fevals
# mergekit-evolve's search is unbounded (CMA-ES from weight 1/n, density 1, sigma 1/6; |weight|, density
# clamped to [0, 1]); evomerge's needs bounds. With normalize (the default for linear and TIES) only the
# ratios of the weights matter, and [0, 1] holds every ratio. Density 0 (nothing kept) is outside (0, 1].
BOUNDS = {"weight": (0.0, 1.0), "density": (0.01, 1.0), "t": (0.0, 1.0)}
NEGATIVE_WEIGHT_LOW = -1.0
MAX_CURVE_POINTS = 16  # search.config.SearchedParameter.points

# Keys that change how mergekit-evolve runs, not what it searches: ignored with one warning each, given
# the values for which evomerge behaves differently. mergekit-evolve's command-line options are accepted
# in the file too (under their option names, dashes as underscores); mergekit-evolve itself ignores them
# there.
IGNORED = {
    "shuffle": (lambda v: v is True, "evomerge scores each task's search split in its fixed order"),
    "random_init": (lambda v: v is True, "evomerge starts from equal weights (the hand-written recipe), "
                                         "then CMA-ES"),
    "load_in_8bit": (lambda v: v is True, "evomerge scores the merge in the config's dtype (bfloat16)"),
    "load_in_4bit": (lambda v: v is True, "evomerge scores the merge in the config's dtype (bfloat16)"),
    "num_gpus": (lambda v: v is not None, "evomerge runs on one device (device:, --device); more workers "
                                          "share a study through its storage"),
    "in_memory": (lambda v: v is not None, "evomerge always merges in memory"),
    "strategy": (lambda v: v is not None, "evomerge's workers share a study through its storage"),
    "storage_path": (lambda v: v is not None, "evomerge writes to results/<name>/ (output_dir:)"),
    "sigma0": (lambda v: v is not None, "evomerge's CMA-ES takes its initial step from the bounds"),
    "force_population_size": (lambda v: v is not None, "evomerge's CMA-ES picks its population size"),
    "merge_cuda": (lambda v: v is not None, "evomerge merges on the search's device"),
    "reshard": (lambda v: v is not None, "evomerge reads the sources' shards as they are"),
    "save_final_model": (lambda v: v is not None, "`evomerge report RUN_DIR --merge` writes the best model"),
    "wandb": (lambda v: v is True, "evomerge writes its report under results/<name>/"),
    "wandb_project": (lambda v: v is not None, "evomerge writes its report under results/<name>/"),
    "wandb_entity": (lambda v: v is not None, "evomerge writes its report under results/<name>/"),
    "allow_crimes": (lambda v: v is not None, "evomerge checks architectures itself"),
    "allow_benchmark_tasks": (lambda v: v is not None, "evomerge has no benchmark-task check"),
}


class Genome(StrictModel):
    """mergekit-evolve's ``genome:`` (``ModelGenomeDefinition``)."""

    models: list[str] = Field(min_length=1)
    merge_method: Literal[tuple(METHOD_PARAMETERS)]
    base_model: str | None = Field(default=None, min_length=1)
    tokenizer_source: str | None = None
    layer_granularity: int = Field(default=0, ge=0)
    normalize: bool | None = None
    allow_negative_weights: bool = False
    filters: list[str] | None = None
    smooth: bool = False

    @field_validator("models")
    @classmethod
    def _distinct_models(cls, models: list[str]) -> list[str]:
        """A model may be a directory, a hub id or mergekit's ``model+adapter`` (a LoRA applied to it)."""
        for ref in models:
            if not ref:
                raise ValueError("an empty model reference")
        if len(set(models)) != len(models):
            raise ValueError(f"{next(m for m in models if models.count(m) > 1)!r} is listed twice")
        return models

    @field_validator("tokenizer_source")
    @classmethod
    def _no_tokenizer_source(cls, source: str | None) -> str | None:
        if source is not None:
            raise ValueError("not supported by evomerge search: its candidates keep the base model's "
                             "tokenizer, so the models must share one (remove tokenizer_source)")
        return source

    @field_validator("filters")
    @classmethod
    def _usable_filters(cls, filters: list[str] | None) -> list[str] | None:
        """Each filter becomes a search group named after it; evomerge names the other tensors ``rest``."""
        for f in filters or []:
            if not f or f == "rest" or filters.count(f) > 1:
                raise ValueError(f"filter {f!r} is empty, listed twice or 'rest' (evomerge's name for the "
                                 "tensors no filter matches)")
        return filters

    @model_validator(mode="after")
    def _method_needs(self):
        if self.merge_method in NEEDS_BASE and self.base_model is None:
            raise ValueError(f"base_model: {self.merge_method} needs a base_model")
        return self


class Task(StrictModel):
    """One of mergekit-evolve's ``tasks:``: a name, or ``{name, weight, metric}``."""

    name: str = Field(min_length=1)
    weight: float = Field(default=1.0, allow_inf_nan=False)
    metric: str = Field(default=DEFAULT_METRIC, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _name_only(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("weight")
    @classmethod
    def _positive(cls, weight: float) -> float:
        if weight <= 0:
            raise ValueError(f"{weight}: evomerge maximizes a weighted average, so weights must be above 0 "
                             "(a lower-is-better metric such as perplexity enters the objective turned around)")
        return weight


class EvolveConfig(StrictModel):
    """mergekit-evolve's config (``EvolMergeConfiguration``) and the command-line options that change
    what it searches."""

    genome: Genome
    tasks: list[Task] = Field(min_length=1)
    limit: int | None = Field(default=None, ge=1)
    num_fewshot: int | None = Field(default=None, ge=0)
    task_search_path: str | list[str] | None = None
    max_fevals: int = Field(default=DEFAULT_MAX_FEVALS, ge=1)
    timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    random_seed: int = Field(default=0, ge=0, le=2**32 - 1)
    batch_size: int | None = Field(default=None, ge=1)
    trust_remote_code: bool = False
    apply_chat_template: bool = True  # mergekit-evolve's defaults
    fewshot_as_multiturn: bool = True
    vllm: bool = False

    @field_validator("tasks")
    @classmethod
    def _distinct_tasks(cls, tasks: list[Task]) -> list[Task]:
        """mergekit-evolve may count one task twice, with two metrics; evomerge scores one metric a task."""
        names = [t.name for t in tasks]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"task {name!r} is listed twice (evomerge's objective takes one metric per task)")
        return tasks

    @field_validator("task_search_path")
    @classmethod
    def _one_path(cls, paths: str | list[str] | None) -> str | list[str] | None:
        if isinstance(paths, list) and len(paths) != 1:
            raise ValueError(f"{paths}: evomerge reads tasks from one directory (include_path); give one")
        return paths

    @field_validator("trust_remote_code")
    @classmethod
    def _no_remote_code(cls, trust: bool) -> bool:
        if trust:
            raise ValueError("true is not supported: evomerge merges and loads architectures that "
                             "transformers knows, without running a model's own code")
        return trust


@dataclass(frozen=True)
class Conversion:
    """The evomerge search config (a mapping ``SearchConfig`` validates) and one warning per ignored key."""

    config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def is_mergekit_evolve(data: Any) -> bool:
    """A mergekit-evolve config is a mapping with a ``genome:`` key (no evomerge search config has one)."""
    return isinstance(data, dict) and "genome" in data


def convert(data: Any, *, name: str = "search", num_layers: int | None = None) -> Conversion:
    """The evomerge search equivalent to the mergekit-evolve config ``data``.

    ``num_layers`` (of ``genome.models[0]``, as mergekit-evolve takes it) is needed only with
    ``layer_granularity`` (which must divide it); ``name`` names the run. Bad input is one
    ``EvomergeError`` line naming the field.
    """
    if not isinstance(data, dict):
        raise EvomergeError(f"expected a mapping of mergekit-evolve config keys, got {type(data).__name__}")
    warnings = [f"{key}: {reason}; ignored" for key, (applies, reason) in IGNORED.items()
                if key in data and applies(data[key])]
    evolve = validate(EvolveConfig, {k: v for k, v in data.items() if k not in IGNORED}, "mergekit-evolve config")
    genome = evolve.genome
    check_combination(genome, num_layers)
    base_model, models = roles(genome)
    search: dict[str, Any] = {
        "name": name,
        "base_model": base_model,
        "models": models,
        "method": genome.merge_method,
        "dtype": "bfloat16",  # mergekit-evolve merges and scores in bfloat16
        "parameters": searched_parameters(genome, num_layers),
        "fixed": fixed_parameters(genome),
    }
    if any(spec.get("granularity") == "blocks" for spec in search["parameters"].values()):
        search["block_size"] = genome.layer_granularity
    search["tasks"] = [{"name": t.name, "weight": t.weight, "metric": evomerge_metric(t.metric)}
                       for t in evolve.tasks]
    path = evolve.task_search_path
    search["include_path"] = path[0] if isinstance(path, list) else path
    search |= {"limit": evolve.limit, "num_fewshot": evolve.num_fewshot}
    if evolve.batch_size is not None:
        search["batch_size"] = evolve.batch_size
    # mergekit-evolve formats prompts with the chat template unless told not to; without one the few-shot
    # examples are plain text either way, so fewshot_as_multiturn only travels with the template.
    search["apply_chat_template"] = evolve.apply_chat_template
    if evolve.apply_chat_template:
        search["fewshot_as_multiturn"] = evolve.fewshot_as_multiturn
    if evolve.vllm:
        search |= {"evaluator": "vllm", "device": "cuda"}
    search |= {"sampler": "cmaes", "n_trials": evolve.max_fevals, "timeout": evolve.timeout,
               "seed": evolve.random_seed}
    if not search["fixed"]:
        del search["fixed"]
    return Conversion(search, warnings)


def check_combination(genome: Genome, num_layers: int | None) -> None:
    """Genome options evomerge's granularities cannot express together, or that mergekit-evolve refuses."""
    g = genome.layer_granularity
    if genome.merge_method == "slerp":
        if genome.smooth or genome.filters:
            raise EvomergeError(f"genome.{'smooth' if genome.smooth else 'filters'}: not supported for slerp "
                                "(as in mergekit-evolve)")
        if len(genome.models) != 2:
            raise EvomergeError(f"genome.models: slerp in evomerge interpolates exactly 2 models, got "
                                f"{len(genome.models)} (mergekit-evolve's pick of the top 2 per layer group has "
                                "no equivalent)")
        if genome.base_model is not None and genome.base_model not in genome.models:
            raise EvomergeError("genome.base_model: slerp interpolates the 2 models; a base_model must be one "
                                "of them (mergekit-evolve would add it as a third slerp input)")
    if genome.filters and g:
        raise EvomergeError("genome.filters: evomerge searches a parameter per filter group or per block of "
                            "layers, not both; drop filters or layer_granularity")
    if genome.filters and genome.smooth:
        raise EvomergeError("genome.filters: evomerge searches a parameter per filter group or as a curve over "
                            "depth, not both; drop filters or smooth")
    if genome.merge_method in NEEDS_BASE and genome.base_model in genome.models:
        raise EvomergeError(f"genome.models: the base_model {genome.base_model} is listed among the models; "
                            "its task vector is zero, so remove it there")
    if g and num_layers is None:
        raise EvomergeError("genome.layer_granularity: needs the layer count of genome.models[0]")
    if g and num_layers % g:
        raise EvomergeError(f"genome.layer_granularity: {g} does not divide the {num_layers} layers of "
                            f"{genome.models[0]} (mergekit-evolve refuses it too)")
    if genome.smooth and g and num_layers // g > MAX_CURVE_POINTS:
        raise EvomergeError(f"genome.smooth: {num_layers // g} points ({num_layers} layers / layer_granularity "
                            f"{g}) exceed evomerge's {MAX_CURVE_POINTS} curve points; raise layer_granularity")


def roles(genome: Genome) -> tuple[str, list[str]]:
    """evomerge's (base_model, models). Slerp interpolates from its base to its one other model; linear
    merges only its models, so its base_model (or the first model) is just the search's reference."""
    if genome.merge_method == "slerp":
        base = genome.base_model or genome.models[0]
        return base, [m for m in genome.models if m != base]
    return genome.base_model or genome.models[0], list(genome.models)


def searched_parameters(genome: Genome, num_layers: int | None) -> dict[str, dict[str, Any]]:
    """One entry per genome parameter, with mergekit-evolve's layout over layers and tensor groups.

    mergekit-evolve's slerp has one value per model and layer group and interpolates the top two by
    their softmax; with two models that is one t per layer group, sigmoid of the difference, in (0, 1).
    """
    g = genome.layer_granularity
    if genome.smooth and g and num_layers // g >= 2:
        layout = {"granularity": "curve", "points": num_layers // g}
    elif g and not genome.smooth and num_layers != g:
        layout = {"granularity": "blocks"}
    elif genome.filters:
        layout = {"granularity": "groups", "groups": list(genome.filters)}
    else:
        layout = {}
    out = {}
    for param in METHOD_PARAMETERS[genome.merge_method]:
        low, high = BOUNDS[param]
        if param == "weight" and genome.allow_negative_weights:
            low = NEGATIVE_WEIGHT_LOW
        out[param] = {"low": low, "high": high, **layout}
    return out


def fixed_parameters(genome: Genome) -> dict[str, bool]:
    """mergekit-evolve always sets ``normalize`` (slerp has none)."""
    if genome.merge_method == "slerp":
        return {}
    normalize = genome.normalize
    return {"normalize": genome.merge_method in NORMALIZED_BY_DEFAULT if normalize is None else normalize}


def evomerge_metric(metric: str) -> str:
    """lm-eval's result key ``acc,none`` is evomerge's ``acc`` (evomerge adds the filter name only for tasks
    with several filters, as ``exact_match,strict-match``)."""
    return metric.removesuffix(",none")


def first_model_layers(genome_data: Any, config_dir: Path | None) -> int | None:
    """The layer count of ``genome.models[0]``, read from its config.json; None when the genome has no
    ``layer_granularity`` (nothing needs it) or is malformed (``convert`` reports that)."""
    if not isinstance(genome_data, dict) or not genome_data.get("layer_granularity"):
        return None
    models = genome_data.get("models")
    if not isinstance(models, list) or not models or not isinstance(models[0], str):
        return None
    config_file = resolve_model_path(models[0], config_dir) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EvomergeError(f"genome.models[0]: {config_file} cannot be read ({exc})") from None
    key = layer_count_key(config)
    if key is None:
        raise EvomergeError(f"genome.models[0]: {config_file} has no layer count (num_hidden_layers)")
    return config[key]


def load_mergekit_evolve(path: str | Path) -> Conversion:
    """The conversion of the mergekit-evolve config file ``path``; errors name the file and the field."""
    path = Path(path)
    data = read_yaml_mapping(path, "mergekit-evolve config")
    try:
        num_layers = first_model_layers(data.get("genome"), path.parent)
        return convert(data, name=path.stem or "search", num_layers=num_layers)
    except EvomergeError as exc:
        raise EvomergeError(f"{path}: {str(exc).removeprefix('mergekit-evolve config: ')}") from None


def load_as_search_config(path: str | Path) -> tuple[SearchConfig, Conversion]:
    """The ``SearchConfig`` a mergekit-evolve config file converts to, checked like a search config file,
    with the conversion (the mapping, to print and reuse, and its warnings)."""
    conversion = load_mergekit_evolve(path)
    config = validate(SearchConfig, conversion.config, f"{path} (converted)")
    check_method_parameters(config)
    return config, conversion
