"""The samplers and pruners a search config names, built over the search's own (fixed) space.

``cmaes``, ``tpe``, ``gp``, ``nsga2`` and ``random`` are Optuna's. ``cmaes_ipop`` and ``cmaes_bipop`` are CMA-ES with
restarts (Auger & Hansen 2005; Hansen 2009), which Optuna's ``CmaEsSampler`` no longer runs (its
``restart_strategy`` is deprecated and ignored): a run that has converged, or sits on a plateau of equal
scores (exact-match metrics make many), starts again from a random point with a larger population (IPOP), or
in BIPOP alternately with a larger one or a small one with a smaller step size, whichever regime has spent
fewer evaluations.

The restart sampler keeps no state of its own: on every ask it replays the study's finished trials (complete,
and pruned ones at their last rung's value) through the ``cmaes`` library in trial-number order, so every
worker of a study and every resumed run agree on the distribution, and it draws each trial's point from a
seed of (study seed, trial number), so two workers never propose the same point.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from search.config import SearchConfig
from search.space import Dimension

__all__ = ["RestartCmaEsSampler", "make_pruner", "make_sampler", "rung_step"]

# A run restarts after this many generations without improving its best value, or as soon as one whole
# generation scores the same (a plateau the step size cannot leave).
STAGNATION_GENERATIONS = 6
SIGMA0 = 1 / 6  # in the unit cube the space is mapped to, as Optuna's CMA-ES starts
# NSGA-II's generation: Optuna's default (50) would leave a 60-trial search one generation of random points.
NSGA2_POPULATION = 12


def fixed_space(dims: list[Dimension]) -> dict[str, FloatDistribution]:
    """The search's dimensions as Optuna distributions, sorted by name as Optuna sorts a relative space."""
    return {d.key: FloatDistribution(d.low, d.high, step=d.step) for d in sorted(dims, key=lambda d: d.key)
            if d.low < d.high}


class _KnownSpaceCmaEsSampler(optuna.samplers.CmaEsSampler):
    """CMA-ES over the search's own dimensions. The stock sampler infers the space on every ask as the
    intersection of all past trials' parameters, a full read of the study costing as much as a small
    model's materialization; a search's space is fixed by its config."""

    def __init__(self, dims: list[Dimension], **kwargs):
        super().__init__(**kwargs)
        self._space = fixed_space(dims)

    def infer_relative_search_space(self, study, trial) -> dict[str, FloatDistribution]:
        return dict(self._space)


@dataclass
class _Run:
    """One CMA-ES run of a restart schedule, and what it has seen."""

    optimizer: object
    regime: str  # "large" or "small" (BIPOP); IPOP runs are all "large"
    best: float = -math.inf
    since_best: int = 0
    evaluations: int = 0


@dataclass
class _Schedule:
    """The restart schedule replayed from the trials: runs so far and evaluations per regime."""

    dim: int
    seed: int
    bipop: bool
    default_popsize: int = 0
    large_popsize: int = 0
    spent: dict[str, int] = field(default_factory=lambda: {"large": 0, "small": 0})
    runs: int = 0

    def __post_init__(self):
        self.default_popsize = 4 + math.floor(3 * math.log(self.dim))
        self.large_popsize = self.default_popsize

    def first(self) -> _Run:
        return self._start(np.full(self.dim, 0.5), SIGMA0, self.default_popsize, "large")

    def restart(self, finished: _Run) -> _Run:
        self.spent[finished.regime] += finished.evaluations
        rng = np.random.default_rng([self.seed, self.runs])
        mean = rng.uniform(0, 1, self.dim)
        if self.bipop and self.runs > 1 and self.spent["small"] < self.spent["large"]:
            u = rng.uniform()
            popsize = max(2, math.floor(self.default_popsize * (0.5 * self.large_popsize / self.default_popsize)
                                        ** (u ** 2)))
            return self._start(mean, SIGMA0 * 10 ** (-2 * rng.uniform()), popsize, "small")
        self.large_popsize *= 2
        return self._start(mean, SIGMA0, self.large_popsize, "large")

    def _start(self, mean: np.ndarray, sigma: float, popsize: int, regime: str) -> _Run:
        import cmaes

        self.runs += 1
        bounds = np.tile([0.0, 1.0], (self.dim, 1))
        optimizer = cmaes.CMA(mean=mean, sigma=sigma, bounds=bounds, seed=self.seed + self.runs,
                              population_size=popsize)
        return _Run(optimizer, regime)


class RestartCmaEsSampler(optuna.samplers.BaseSampler):
    """IPOP (``bipop=False``) or BIPOP CMA-ES over the search's fixed space, maximizing the objective."""

    def __init__(self, dims: list[Dimension], *, seed: int = 0, bipop: bool = False):
        self._space = fixed_space(dims)
        self._seed = seed
        self._bipop = bipop
        self._random = optuna.samplers.RandomSampler(seed=seed)

    def reseed_rng(self) -> None:
        self._random.reseed_rng()

    def infer_relative_search_space(self, study, trial) -> dict[str, FloatDistribution]:
        return dict(self._space)

    def sample_relative(self, study, trial, search_space) -> dict[str, float]:
        if not search_space:
            return {}
        keys = list(search_space)
        low = np.array([search_space[k].low for k in keys])
        span = np.array([search_space[k].high for k in keys]) - low
        run = self.replay(study, keys, low, span)
        run.optimizer.reseed_rng(int(np.random.default_rng([self._seed, trial.number]).integers(2**31)))
        x = run.optimizer.ask()
        return {k: float(min(max(lo + s * v, search_space[k].low), search_space[k].high))
                for k, lo, s, v in zip(keys, low, span, x)}

    def replay(self, study, keys: list[str], low: np.ndarray, span: np.ndarray) -> _Run:
        """The current run after telling every finished trial's (point, value) in trial-number order (a
        generation is told once it has a population's worth of them)."""
        schedule = _Schedule(len(keys), self._seed, self._bipop)
        run = schedule.first()
        generation: list[tuple[np.ndarray, float]] = []
        for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                        key=lambda t: t.number):
            if t.value is None or not all(k in t.params for k in keys) or not math.isfinite(t.value):
                continue
            x = np.clip((np.array([t.params[k] for k in keys]) - low) / span, 0.0, 1.0)
            generation.append((x, -t.value))  # cmaes minimizes
            if len(generation) < run.optimizer.population_size:
                continue
            run.optimizer.tell(generation)
            run.evaluations += len(generation)
            values = [-v for _, v in generation]
            generation = []
            if max(values) > run.best:
                run.best, run.since_best = max(values), 0
            else:
                run.since_best += 1
            if run.optimizer.should_stop() or run.since_best >= STAGNATION_GENERATIONS or len(set(values)) == 1:
                run = schedule.restart(run)
        return run

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._random.sample_independent(study, trial, param_name, param_distribution)


def make_sampler(config: SearchConfig, dims: list[Dimension]) -> optuna.samplers.BaseSampler:
    """The config's sampler. CMA-ES and TPE learn from pruned trials too (at their last rung's value). TPE,
    NSGA-II and GP take several objectives, and the constraints the loop sets on each trial
    (``Trial.set_constraint``); the random sampler ignores both (the report still tells feasible trials apart)."""
    name = config.sampler_name
    if name == "cmaes":
        import cmaes  # noqa: F401  imported now (0.7 s, it pulls scipy.stats), not inside the first trial's ask

        with warnings.catch_warnings():  # experimental since Optuna 2.0, unchanged since
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return _KnownSpaceCmaEsSampler(dims, seed=config.seed, warn_independent_sampling=False,
                                           consider_pruned_trials=True)
    if name in ("cmaes_ipop", "cmaes_bipop"):
        return RestartCmaEsSampler(dims, seed=config.seed, bipop=name == "cmaes_bipop")
    if name == "tpe":
        # group: a method list makes the space conditional, and TPE then models each method's parameters together
        with warnings.catch_warnings():  # group: experimental since Optuna 2.8, unchanged since
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=config.seed, multivariate=True, group=len(config.methods) > 1)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=config.seed, n_startup_trials=min(10, 2 * len(dims) + 1),
                                         warn_independent_sampling=False)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=config.seed, population_size=NSGA2_POPULATION)
    return optuna.samplers.RandomSampler(seed=config.seed)


def rung_step(config: SearchConfig, rung: int) -> int:
    """The step rung ``rung`` reports at: reduction_factor^rung, so Optuna's successive halving (minimum
    resource 1) checks each rung whatever the rungs' sizes."""
    return config.fidelity.reduction_factor ** rung


def make_pruner(config: SearchConfig) -> optuna.pruners.BasePruner:
    if config.fidelity is None:
        return optuna.pruners.NopPruner()
    factor = config.fidelity.reduction_factor
    if config.fidelity.pruner == "hyperband":
        last = rung_step(config, len(config.fidelity.rungs) - 1)
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=last, reduction_factor=factor)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=factor)
