"""The search config (YAML → pydantic): models, method, search space, tasks, sampler, budget, storage."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from merge_core.errors import EvomergeError
from merge_core.methods import get_method
from merge_core.recipe import StrictModel, read_yaml_mapping, validate


class SearchedParameter(StrictModel):
    """Bounds of one merge parameter and how finely it varies across the model.

    ``granularity``: ``global`` (one value), ``groups`` (one value per tensor-name filter group of
    ``groups``, plus the rest), ``blocks`` (one value per block of ``block_size`` layers) or ``curve``
    (``points`` control points interpolated over depth, like a mergekit gradient).
    """

    low: float
    high: float
    granularity: Literal["global", "groups", "blocks", "curve"] = "global"
    points: int = Field(default=3, ge=2, le=16)
    groups: list[str] = Field(default_factory=lambda: ["self_attn", "mlp"])

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class TaskSpec(StrictModel):
    name: str
    weight: float = Field(default=1.0, gt=0)
    metric: str | None = None


class SearchConfig(StrictModel):
    """Everything ``evomerge search`` needs; see the README's search config reference."""

    name: str = "search"
    base_model: str
    models: list[str] = Field(min_length=1)
    method: str = "ties"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    parameters: dict[str, SearchedParameter] = Field(default_factory=dict)
    fixed: dict[str, float | bool | str] = Field(default_factory=dict)
    block_size: int = Field(default=4, ge=1)
    tasks: list[TaskSpec] = Field(min_length=1)
    include_path: str | None = "configs/tasks"
    limit: int | None = Field(default=None, ge=1)
    num_fewshot: int | None = Field(default=None, ge=0)
    batch_size: int = Field(default=64, ge=1)
    sampler: Literal["cmaes", "tpe", "random"] = "cmaes"
    n_trials: int | None = Field(default=60, ge=1)
    timeout: float | None = Field(default=None, gt=0)
    seed: int = 0
    storage: str | None = None
    study_name: str | None = None
    heartbeat_seconds: int = Field(default=10, ge=1)
    grace_seconds: int = Field(default=40, ge=1)
    output_dir: str | None = None
    device: str = "cpu"
    threads: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _budget(self):
        if self.n_trials is None and self.timeout is None:
            raise ValueError("give n_trials, timeout or both")
        if len(set(self.models)) != len(self.models):
            raise ValueError("models: a model is listed twice")
        if self.grace_seconds <= self.heartbeat_seconds:
            raise ValueError(f"grace_seconds ({self.grace_seconds}) must exceed heartbeat_seconds "
                             f"({self.heartbeat_seconds}): a live worker would look dead between two beats")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"results/{self.name}")

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.run_dir / 'study.db').as_posix()}"

    @property
    def study(self) -> str:
        return self.study_name or self.name


def check_method_parameters(config: SearchConfig) -> None:
    """Searched and fixed parameters must be parameters of the method (per-model or global)."""
    method = get_method(config.method)
    known = {**method.model_params, **method.params}
    for where, names in (("parameters", config.parameters), ("fixed", config.fixed)):
        for name in names:
            if name not in known:
                raise EvomergeError(f"{where}.{name}: {config.method} has no parameter {name!r} "
                                    f"(it has: {', '.join(sorted(known))})")
    if not config.parameters:
        raise EvomergeError("parameters: nothing to search (give at least one parameter with low/high)")


def load_search_config(path: str | Path) -> SearchConfig:
    data = read_yaml_mapping(path, "search config")
    config = validate(SearchConfig, data, str(path))
    check_method_parameters(config)
    return config
