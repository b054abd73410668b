"""The search loop: Optuna ask/tell over recipes materialized in memory into one live model.

Recipe (from the sampler's point) → ``merge_into`` writes the tensors into the live model → the evaluator
returns ``Scores`` → their weighted average is told to Optuna. Sources are read once; nothing is written
to disk per trial. The study lives in an RDB storage (SQLite by default, PostgreSQL for several
workers), so a search resumes after a crash and several processes can share one study.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import socket
import sqlite3
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, ProgrammingError, SQLAlchemyError

from merge_core.adapters import SourceOpener, is_adapter, resolve_source, split_ref
from merge_core.architecture import count_layers
from merge_core.engine import merge_into
from merge_core.errors import EvomergeError
from merge_core.memory import check_memory, load_in_memory, plan_memory
from merge_core.plan import Source
from merge_core.recipe import load_recipe
from merge_core.routing import LayerBank, Slot, assemble, live_model, path_of_recipe
from merge_core.runtime import DTYPES, progress_bar
from search._optuna_compat import heartbeat, rdb_backend, set_user_attrs_in_one_transaction, storage_of, trial_id
from search.config import SearchConfig
from search.objectives import Objective, anchors_from, describe_objective
from search.preflight import build_evaluator, preflight, root_cause, sqlite_file
from search.routing import RoutingSpace, routing_space
from search.samplers import make_pruner, make_sampler, rung_step
from search.space import (
    METHOD_KEY,
    Dimension,
    build_recipe,
    dimensions,
    dims_for,
    handwritten_point,
    model_labels,
    source_points,
)

MAX_RETRY = 2
REFRESH_SECONDS = 1.0  # how often a worker reads other workers' trials for its budget check and progress bar
# Whole-tensor precomputations a search keeps (task vectors, plus sorted magnitudes for float32): all of a
# small family's, about half of three 1B bf16 fine-tunes' task vectors; the rest streams per trial. On CPU
# at most half of the memory left once the live model and converted sources are in (``MemoryPlan``).
PRECOMPUTE_BYTES = 4 << 30
# A search stops (one line, exit 2) when this many candidates in a row fail for the same reason: a config
# every candidate fails on would otherwise spend its whole budget, or with a timeout alone all of it.
REPEATED_FAILURES = 5
# Errors of the study's storage itself: the search stops on them rather than failing trials.
STORAGE_ERRORS = (SQLAlchemyError, optuna.exceptions.StorageInternalError)


@event.listens_for(Engine, "connect")
def _sqlite_write_ahead_log(dbapi_connection, _record) -> None:
    """SQLite commits without an fsync each (WAL, synchronous=NORMAL): a trial makes a dozen small writes,
    which otherwise cost more than scoring a small model. Committed data survives a crashed process.
    Registered for every engine of the process, not only the study's: a connection to the same file that
    misses these settings (a report's, a config check's) left the database malformed after a worker was
    killed (tests/test_crash_safety.py), so each SQLite connection gets them from its first statement."""
    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def open_storage(config: SearchConfig) -> RDBStorage:
    """An RDB storage with heartbeats, so trials of a killed worker are failed and retried (every worker of
    a study should use the same heartbeat and grace settings)."""
    if config.storage is None:
        config.run_dir.mkdir(parents=True, exist_ok=True)
    elif (db := sqlite_file(config.storage_url)) is not None:
        db.parent.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its directory
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.9
                storage = RDBStorage(config.storage_url, heartbeat_interval=config.heartbeat_seconds,
                                     grace_period=config.grace_seconds,
                                     heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                                         max_retry=MAX_RETRY))
            return storage
        except (IntegrityError, ProgrammingError):
            if attempt == 4:
                raise EvomergeError(f"storage {config.storage_url}: could not create Optuna's tables") from None
            time.sleep(0.5 + random.random())  # workers started together race to create the schema
        except Exception as exc:
            raise EvomergeError(f"storage {config.storage_url}: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0]}") from None


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_orphaned_trials(study: optuna.Study, grace_seconds: float) -> None:
    """Fail (and so retry) RUNNING trials of dead workers on this host at once, without waiting for the
    heartbeat grace period; trials of other hosts (or of a hung worker) are failed by Optuna's
    stale-heartbeat check once their heartbeat is older than the grace period. A trial whose worker died
    between Optuna's ask and naming itself has neither a worker nor a heartbeat: it is failed once it is
    older than the grace period. Run at start-up and during the search, by every worker: when two fail
    the same trial, one wins and retries it."""
    host = socket.gethostname()
    storage = storage_of(study)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", "")
        worker_host, _, pid = worker.rpartition(":")
        dead = worker_host == host and pid.isdigit() and not _alive(int(pid))
        unnamed = not worker and trial.datetime_start is not None and (
            datetime.now() - trial.datetime_start).total_seconds() > grace_seconds
        if dead or unnamed:
            try:
                storage.set_trial_user_attr(trial_id(trial), "fail_reason",
                                            f"worker {worker} died" if dead else "its worker died before naming itself")
                if storage.set_trial_state_values(trial_id(trial), state=TrialState.FAIL):
                    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, storage.get_trial(trial_id(trial)))
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker failed it first, or its worker finished it meanwhile
    with warnings.catch_warnings():  # experimental since Optuna 2.9, unchanged since
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def counts(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial counts against ``n_trials``: complete, pruned (at what its rungs cost), running, or
    failed because its candidate failed (so a budget is always finite). A trial failed because its worker
    died or was interrupted does not count: it is retried; nor does one another worker's last slot made
    surplus."""
    if trial.state == TrialState.PRUNED:
        return not trial.user_attrs.get("surplus")
    if "source" in trial.user_attrs:
        return False  # a warm start told from the baselines: nothing was evaluated for it
    return trial.state in (TrialState.COMPLETE, TrialState.RUNNING) or (
        trial.state == TrialState.FAIL and bool(trial.user_attrs.get("candidate_failed")))


def done_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that count against the budget (see ``counts``)."""
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.FAIL)
    return [t for t in study.get_trials(deepcopy=False, states=states) if counts(t)]


def items_scored(scores) -> int:
    """Item-evaluations of one candidate: documents scored, summed over tasks."""
    return sum(task.n for task in scores.tasks.values())


def items_spent(done: list[optuna.trial.FrozenTrial]) -> int:
    return sum(int(t.user_attrs.get("items", 0)) for t in done)


def budget_left(done: list[optuna.trial.FrozenTrial], config: SearchConfig, started: float) -> bool:
    if _timed_out(config, started):
        return False
    if config.max_items is not None and items_spent(done) >= config.max_items:
        return False
    return config.n_trials is None or len(done) < config.n_trials


def _timed_out(config: SearchConfig, started: float) -> bool:
    return config.timeout is not None and time.monotonic() - started >= config.timeout


def _others_running(done: list[optuna.trial.FrozenTrial]) -> bool:
    """Trials of other workers still count against the budget: if such a worker dies, its trial is
    retried, and a worker that stopped now would leave the study a trial short."""
    return any(t.state == TrialState.RUNNING for t in done)


@dataclass
class Workbench:
    """Everything loaded once per search: sources in memory, the live model, its tokenizer, the evaluator."""

    config: SearchConfig
    paths: dict[str, str]
    sources: dict[str, Source]  # in memory: TensorSource, or LoraSource over the base's TensorSource
    model: Any
    tokenizer: Any
    evaluator: Any
    num_layers: int
    dims: list[Dimension] = field(default_factory=list)
    cache: dict = field(default_factory=dict)
    precompute_bytes: int = PRECOMPUTE_BYTES
    objective: Objective | None = None  # set once the baselines are scored (the relative scale's anchors)
    baseline_scores: dict[str, Any] = field(default_factory=dict)  # label → Scores, for constraints
    routing: RoutingSpace | None = None  # a layer-path search: candidates are paths through ``bank``'s layers
    bank: LayerBank | None = None
    # layer paths: recipe → (trial number, scores) of the paths this process scored in full, so that a path
    # the sampler proposes again gets its scores without a second evaluation
    scored: dict[str, tuple[int, Any]] = field(default_factory=dict)

    def distribution(self, key: str):
        """The Optuna distribution of one key of the space (a float dimension, or the method)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        if key == METHOD_KEY:
            return CategoricalDistribution(self.config.methods)
        d = next(d for d in self.dims if d.key == key)
        return FloatDistribution(d.low, d.high, step=d.step)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """The trial's point: its method (with a method list), then that method's dimensions."""
        if self.routing is not None:
            return {d.key: trial.suggest_float(d.key, d.low, d.high, step=d.step) for d in self.dims}
        point: dict[str, Any] = {}
        method = self.config.methods[0]
        if len(self.config.methods) > 1:
            method = point[METHOD_KEY] = trial.suggest_categorical(METHOD_KEY, self.config.methods)
        point.update({d.key: trial.suggest_float(d.key, d.low, d.high) for d in dims_for(self.dims, method)})
        return point

    def outcome(self, scores) -> dict[str, Any]:
        """What a trial's scores become: its average, and with constraints their values as Optuna takes them
        (≤ 0: satisfied, i.e. minus each margin) and whether all hold."""
        attrs: dict[str, Any] = {"average": self.objective.average(scores)}
        if self.config.constraints:
            margins = self.objective.margins(scores, self.baseline_scores)
            attrs["constraints"] = [-m for m in margins]
            attrs["feasible"] = all(m >= 0 for m in margins)
        return attrs

    def recipe(self, values: dict[str, float], *, portable: bool = False) -> dict[str, Any]:
        """The candidate's recipe; ``portable`` spells model paths out (an adapter as ``BASE+ADAPTER``, which
        mergekit reads) and records the seed, for export."""
        paths = export_paths(self.paths, self.config.base_model) if portable else None
        if self.routing is not None:
            recipe = self.routing.recipe(values, paths)
        else:
            recipe = build_recipe(self.config, self.dims, values, self.num_layers, paths)
        if portable:
            recipe["evomerge"] = {"version": _version(), "seed": self.config.seed}
        return recipe

    def materialize(self, recipe: dict[str, Any]) -> None:
        if self.routing is not None:
            assemble(self.model, self.bank, path_of_recipe(recipe))
            return
        merge_into(self.model, load_recipe(recipe, strict=True), self.sources, device=self.config.device,
                   seed=self.config.seed, cache=self.cache, precompute_bytes=self.precompute_bytes)

    def load_source(self, ref: str) -> None:
        """Put one source model's own weights into the live model (for baselines)."""
        if self.routing is not None:
            assemble(self.model, self.bank, [Slot(ref, layer) for layer in range(self.bank.num_layers(ref))])
            return
        state = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in state.items():
                source = self.sources[ref]
                if source.has(name):
                    tensor.copy_(source.get(name))


def export_paths(paths: dict[str, str], base_ref: str) -> dict[str, str]:
    """Model ref → the path exported recipes name: a bare adapter directory as ``BASE+ADAPTER`` (mergekit
    reads only that form; evomerge reads both)."""
    base = paths[base_ref]
    return {ref: f"{base}+{path}" if "+" not in path and is_adapter(Path(path)) else path
            for ref, path in paths.items()}


def resolve_paths(config: SearchConfig, config_dir: Path | None) -> dict[str, str]:
    return {ref: resolve_source(ref, config_dir) for ref in [config.base_model, *config.models]}


def self_contained(config: SearchConfig, config_dir: Path | None) -> SearchConfig:
    """The config with local paths made absolute (from the CWD, else the config's directory), so the
    study's stored copy works for reports and workers started from anywhere."""
    def local(path: str | None) -> str | None:
        if path is None or Path(path).is_absolute():
            return path
        model, adapter = split_ref(path, config_dir)
        if adapter is not None:
            return f"{local(model)}+{local(adapter)}"
        for candidate in (Path(path), (config_dir / path) if config_dir else None):
            if candidate is not None and candidate.exists():
                return str(candidate.resolve())
        return path

    def file(path: str | None) -> str | None:
        if path is None or Path(path).is_absolute():
            return path
        found = next((c for c in (Path(path), (config_dir / path) if config_dir else None) if c and c.exists()), None)
        return str(found.resolve()) if found else path

    texts = [p.model_copy(update={"text": file(p.text), "test_text": file(p.test_text)}) for p in config.perplexity]
    return config.model_copy(update={"base_model": local(config.base_model),
                                     "models": [local(m) for m in config.models],
                                     "include_path": local(config.include_path), "perplexity": texts})


def _load_sources(config: SearchConfig, config_dir: Path | None):
    """Every source read once, checked against free memory and held in memory (also under the names exported
    recipes give them, which the report re-materializes). Returns (paths, readers, sources, memory plan)."""
    paths = resolve_paths(config, config_dir)
    opener = SourceOpener()
    readers = {ref: opener.open(path, paths[config.base_model]) for ref, path in paths.items()}
    memory = plan_memory(readers, config.base_model, DTYPES[config.dtype])
    if config.device == "cpu":
        check_memory(memory, config.dtype)
    sources = load_in_memory(readers, dtype=DTYPES[config.dtype], device=config.device)
    for ref, exported in export_paths(paths, config.base_model).items():
        sources.setdefault(exported, sources[ref])
    return paths, readers, sources, memory


def open_workbench(config: SearchConfig, config_dir: Path | None = None, evaluator=None) -> Workbench:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.routing_only:
        return open_routing_workbench(config, config_dir, evaluator)
    paths, readers, sources, memory = _load_sources(config, config_dir)
    base = readers[config.base_model]
    num_layers = count_layers(base.names, base.config, config.base_model)
    model = AutoModelForCausalLM.from_pretrained(paths[config.base_model], dtype=DTYPES[config.dtype])
    model = model.to(config.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(paths[config.base_model])
    bench = Workbench(config, paths, sources, model, tokenizer, evaluator or build_evaluator(config), num_layers)
    bench.dims = dimensions(config, num_layers)
    bench.precompute_bytes = memory.cache_budget(PRECOMPUTE_BYTES) if config.device == "cpu" else PRECOMPUTE_BYTES
    return bench


def open_routing_workbench(config: SearchConfig, config_dir: Path | None = None, evaluator=None) -> Workbench:
    """A layer-path search's bench: every source in memory once, its modules over those tensors (``LayerBank``),
    and a live model whose layer list each candidate repoints (nothing merged, nothing copied)."""
    from transformers import AutoTokenizer

    paths, _, sources, _ = _load_sources(config, config_dir)
    bank = LayerBank(sources, DTYPES[config.dtype], config.device)
    layer_counts = {ref: bank.num_layers(ref) for ref in sources}
    space = routing_space(config, layer_counts)
    model = live_model(bank, config.base_model)
    tokenizer = AutoTokenizer.from_pretrained(paths[config.base_model])
    bench = Workbench(config, paths, sources, model, tokenizer, evaluator or build_evaluator(config),
                      layer_counts[config.base_model], routing=space, bank=bank)
    bench.dims = space.dims
    return bench


def constraint_values(attrs: dict[str, Any]) -> dict[str, float] | None:
    """A trial's constraints as Optuna keeps them (``Trial.set_constraint``: ≤ 0 satisfied, one key per
    constraint), from the values ``Workbench.outcome`` stored; None without constraints."""
    if "constraints" not in attrs:
        return None
    return {str(i): float(v) for i, v in enumerate(attrs["constraints"])}


def objective_of(scores, config: SearchConfig, anchors=None) -> float:
    """The weighted average over ``tasks`` (see ``search.objectives``; the relative scale needs ``anchors``)."""
    return Objective(config, anchors).average(scores)


def rank_value(trial: optuna.trial.FrozenTrial) -> float:
    """What ranks complete trials: the objective of a single-objective study, else the average over ``tasks``."""
    values = trial.values or []
    return values[0] if len(values) == 1 else float(trial.user_attrs.get("average", math.nan))


def rank_key(trial: optuna.trial.FrozenTrial) -> tuple[float, int]:
    """Best first, ties by the earliest trial; NaN (never for a complete trial) last."""
    value = rank_value(trial)
    return (-value if value == value else math.inf, trial.number)


def baseline_objectives(baselines_scores: dict[str, Any], base_label: str, config: SearchConfig,
                        anchors) -> dict[str, dict[str, Any]]:
    """Per baseline: ``objective`` (ranked like trials, see ``rank_value``), ``values`` (one per objective)."""
    objective = Objective(config, anchors)
    out = {}
    for label, scores in baselines_scores.items():
        values = objective.values(scores)
        out[label] = {"objective": values[0] if len(values) == 1 else objective.average(scores), "values": values}
    return out


def score_baselines(study: optuna.Study, bench: Workbench) -> dict[str, Any]:
    """Score the base and every source once per study, with the settings every trial gets; then fix the
    objective's anchors (base and best source per task) and each baseline's objective values."""
    from evaluators import Scores
    from merge_core.inventory import model_inventory

    baselines = dict(study.user_attrs.get("baselines", {}))
    labels = model_labels([bench.config.base_model, *bench.config.models])
    for ref in [bench.config.base_model, *bench.config.models]:
        label = labels[ref]
        if label in baselines:
            continue
        bench.load_source(ref)
        scores = bench.evaluator.score(bench.model, bench.tokenizer)
        Objective(bench.config).check_metrics(scores)
        baselines[label] = {"model": bench.paths[ref], "is_base": ref == bench.config.base_model,
                            "scores": scores.to_dict(), "inventory": model_inventory(bench.paths[ref])}
        study.set_user_attr("baselines", baselines)
    base_label = labels[bench.config.base_model]
    bench.baseline_scores = {label: Scores.from_dict(b["scores"]) for label, b in baselines.items()}
    anchors = anchors_from(bench.baseline_scores, base_label, bench.config)
    bench.objective = Objective(bench.config, anchors)
    for label, values in baseline_objectives(bench.baseline_scores, base_label, bench.config, anchors).items():
        baselines[label] = {**baselines[label], **values}
    if baselines != study.user_attrs.get("baselines"):
        study.set_user_attr("baselines", baselines)
    return baselines


def add_source_trials(study: optuna.Study, bench: Workbench, baselines: dict[str, Any]) -> None:
    """Warm starts at no cost: each source that is a point of the space (``source_points``) is told to the
    sampler as a complete trial with its baseline score, once per study. They do not count against the
    budget and are marked ``source`` (their recipe reproduces the source)."""

    existing = {t.user_attrs.get("source") for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    if "sources" not in bench.config.warm_start:
        return
    for label, point in _source_points(bench).items():
        if label in existing or label not in baselines:
            continue
        baseline = baselines[label]
        distributions = {key: bench.distribution(key) for key in point}
        attrs = {"source": label, "recipe": bench.recipe(point, portable=True), "scores": baseline["scores"],
                 "items": 0, **bench.outcome(bench.baseline_scores[label])}
        study.add_trial(optuna.trial.create_trial(
            params=point, distributions=distributions, values=baseline["values"], user_attrs=attrs,
            constraints=constraint_values(attrs)))


def _source_points(bench: Workbench) -> dict[str, dict[str, Any]]:
    if bench.routing is None:
        return source_points(bench.config, bench.dims)
    labels = model_labels([bench.config.base_model, *bench.config.models])
    points = {labels[ref]: bench.routing.point(bench.routing.source_path(ref, bench.bank.num_layers(ref)))
              for ref in bench.routing.sources if ref in labels}
    return {label: point for label, point in points.items() if point is not None}


class _StopFlag:
    """First Ctrl-C: finish the current trial, then stop. Second Ctrl-C: stop now."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after the current trial (Ctrl-C again to stop now)", flush=True)


def _surplus(done: list[optuna.trial.FrozenTrial], trial: optuna.Trial, config: SearchConfig) -> bool:
    """Another worker took the last slot of the budget between our check and our ask."""
    if config.n_trials is None:
        return False
    return sum(t.number < trial.number for t in done) >= config.n_trials


def run_trial(study: optuna.Study, bench: Workbench, known: list[optuna.trial.FrozenTrial], refresh: bool
              ) -> tuple[optuna.trial.FrozenTrial | None, list[optuna.trial.FrozenTrial]]:
    """Ask, materialize, score, tell. Returns the told trial (None when other workers used up the budget
    meanwhile) and the study's complete and running trials: ``known`` (the last read) plus this one. The
    study is read again (a read costs as much as a small model's materialization) only when ``refresh``
    asks for other workers' trials, or when this trial's number reaches the budget, which is the only
    way another worker can have taken its slot."""
    with warnings.catch_warnings():  # this loop runs the heartbeat itself (``heartbeat``), as optimize would
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        trial = study.ask()
    reaches_budget = bench.config.n_trials is not None and trial.number >= bench.config.n_trials
    done = done_trials(study) if refresh or reaches_budget else known
    if _surplus(done, trial, bench.config):
        _set_user_attrs(study, trial, {"worker": _worker_id(), "surplus": True})
        study.tell(trial, state=TrialState.PRUNED)
        return None, done
    frozen = _score_trial(study, trial, bench)
    others = [t for t in done if t.number != frozen.number]
    return frozen, (others + [frozen] if counts(frozen) else others)


def _score_trial(study: optuna.Study, trial: optuna.Trial, bench: Workbench) -> optuna.trial.FrozenTrial:
    with heartbeat(study, trial):
        try:
            values = bench.suggest(trial)
            recipe = bench.recipe(values)
            _set_user_attrs(study, trial, {"worker": _worker_id(), "recipe": bench.recipe(values, portable=True)})
            # only a layer path (discrete) is proposed again; without fidelity its score is its full score
            recipe_key = json.dumps(recipe, sort_keys=True) if bench.routing and not bench.config.fidelity else None
            if recipe_key in bench.scored:
                return _tell_again(study, trial, bench, *bench.scored[recipe_key])
            started = time.perf_counter()
            bench.materialize(recipe)
            merged = time.perf_counter()
            rungs = bench.config.fidelity.sizes if bench.config.fidelity else [None]
            scored = (bench.evaluator.score_rungs(bench.model, bench.tokenizer, rungs) if bench.config.fidelity
                      else iter([bench.evaluator.score(bench.model, bench.tokenizer)]))
            for rung, scores in enumerate(scored):
                objective_values = bench.objective.values(scores)
                last = rung == len(rungs) - 1
                if any(v != v for v in objective_values):
                    raise EvomergeError("the objective is NaN")
                if bench.config.fidelity:
                    trial.report(objective_values[0], rung_step(bench.config, rung))
                if last or trial.should_prune():
                    break
            attrs = {"scores": scores.to_dict(), "materialize_seconds": merged - started,
                     "eval_seconds": time.perf_counter() - merged, "items": items_scored(scores),
                     **bench.outcome(scores)}
            if bench.config.fidelity:
                attrs["rung"] = rung
            _set_user_attrs(study, trial, attrs)
            for key, value in (constraint_values(attrs) or {}).items():
                trial.set_constraint(key, value)
            if not last:
                return study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
            if recipe_key is not None:
                bench.scored[recipe_key] = (trial.number, scores)
            return study.tell(trial, objective_values, skip_if_finished=True)
        except KeyboardInterrupt:  # a second Ctrl-C: the candidate is not at fault, so it is queued again
            if storage_of(study).get_trial(trial_id(trial)).state == TrialState.RUNNING:
                RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, _fail(study, trial, "interrupted"))
            raise
        except STORAGE_ERRORS:
            raise  # not the candidate's fault: the trial stays running and is retried by another start
        except (Exception, MemoryError) as exc:
            return _fail(study, trial, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                         candidate_failed=True)


def _tell_again(study: optuna.Study, trial: optuna.Trial, bench: Workbench, number: int,
                scores) -> optuna.trial.FrozenTrial:
    """A candidate scored before (trial ``number``): the same scores, no evaluation, no items spent."""
    attrs = {"scores": scores.to_dict(), "materialize_seconds": 0.0, "eval_seconds": 0.0, "items": 0,
             "same_as": number, **bench.outcome(scores)}
    _set_user_attrs(study, trial, attrs)
    for k, value in (constraint_values(attrs) or {}).items():
        trial.set_constraint(k, value)
    frozen = study.tell(trial, bench.objective.values(scores), skip_if_finished=True)
    if bench.routing is not None:
        _enqueue_neighbor(study, bench, trial.number)
    return frozen


def _enqueue_neighbor(study: optuna.Study, bench: Workbench, number: int) -> None:
    """A sampler that proposes a layer path it has seen has settled on a plateau (TPE does so on 0/1
    dimensions): queue one unscored path a slot away from the best, so the next trial moves on from there."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.params]
    if not complete:
        return
    best = sorted(complete, key=rank_key)[0]
    waiting = {json.dumps(t.params, sort_keys=True) for t in study.get_trials(deepcopy=False,
                                                                               states=(TrialState.WAITING,))}
    fresh = [p for p in bench.routing.neighbors(best.params)
             if json.dumps(bench.recipe(p), sort_keys=True) not in bench.scored
             and json.dumps(p, sort_keys=True) not in waiting]
    if fresh:
        study.enqueue_trial(random.Random(number).choice(fresh), user_attrs={"neighbor_of": best.number})


def _fail(study: optuna.Study, trial: optuna.Trial, reason: str,
          candidate_failed: bool = False) -> optuna.trial.FrozenTrial:
    """Fail the trial with its reason, unless another worker already failed it (taking its heartbeat
    for a dead worker's) and queued its retry: then this result is dropped. ``candidate_failed`` marks
    a failure of the candidate itself, which counts against the budget (a dead worker's does not)."""
    attrs = {"fail_reason": reason, **({"candidate_failed": True} if candidate_failed else {})}
    try:
        for key, value in attrs.items():  # one by one: each write checks the trial is still running
            trial.set_user_attr(key, value)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass
    return study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)


def _set_user_attrs(study: optuna.Study, trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """Several user attributes in one RDB transaction: a commit each costs more than a small model's
    materialization. (Optuna has no public batch call; other storages get one call per attribute.)"""
    backend = rdb_backend(study)
    if backend is None:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    set_user_attrs_in_one_transaction(backend, trial, attrs)


# Config fields a rerun may change and still continue its study: the budget and where and how it runs.
# Every other field (method, models, base, parameters, fixed, tasks and metrics, limit, num_fewshot, dtype,
# seed, block size, include path, and fields added later) changes the objective or the space.
RERUN_FREE_FIELDS = frozenset({"n_trials", "timeout", "max_items", "warm_start", "threads", "batch_size", "device",
                               "sampler", "storage", "study_name", "output_dir", "name"})
RERUN_CHOICES = ("check", "new", "continue")


def config_differences(stored: dict[str, Any], config: SearchConfig) -> list[str]:
    """``field: old → new`` for every field outside ``RERUN_FREE_FIELDS`` where the study's stored config and
    ``config`` differ (nested fields by path, e.g. ``tasks[0].metric``)."""
    try:  # a config stored by an older evomerge gets the defaults of fields added since
        stored = json.loads(SearchConfig.model_validate(stored).model_dump_json())
    except Exception:
        pass
    new = json.loads(config.model_dump_json())
    shown = lambda value: (lambda text: text if len(text) <= 80 else text[:77] + "...")(json.dumps(value))  # noqa: E731
    found: list[str] = []

    def walk(path: str, old: Any, now: Any) -> None:
        if isinstance(old, dict) and isinstance(now, dict):
            for key in [*now, *(k for k in old if k not in now)]:
                walk(f"{path}.{key}", old.get(key), now.get(key))
        elif isinstance(old, list) and isinstance(now, list) and len(old) == len(now):
            for i, (a, b) in enumerate(zip(old, now)):
                walk(f"{path}[{i}]", a, b)
        elif old != now:
            found.append(f"{path}: {shown(old)} → {shown(now)}")

    for key in [*new, *(k for k in stored if k not in new)]:
        if key not in RERUN_FREE_FIELDS:
            walk(key, stored.get(key), new.get(key))
    return found


def changed_config_error(config: SearchConfig, changes: list[str]) -> EvomergeError:
    return EvomergeError(
        f"study {config.study!r} in {public_url(config.storage_url)} was made with another config "
        f"({'; '.join(changes)}): "
        "give --new-study to start a new study (the old one is kept), or --continue-anyway to go on with "
        "this config (trials so far keep the values of the old objective)")


def reconcile_config(study: optuna.Study, config: SearchConfig, rerun: str = "check") -> None:
    """A rerun whose config changes the objective or the space stops (``check``), unless ``continue``: then
    the config is replaced (the old one and its baselines kept in ``config_history``) and baselines rescored."""
    stored = study.user_attrs["config"]
    changes = config_differences(stored, config)
    if not changes:
        return
    if rerun != "continue":
        raise changed_config_error(config, changes)
    history = list(study.user_attrs.get("config_history", []))
    history.append({"config": stored, "baselines": study.user_attrs.get("baselines", {}),
                    "trials": len(study.get_trials(deepcopy=False)), "changes": changes})
    study.set_user_attr("config_history", history)
    study.set_user_attr("config", json.loads(config.model_dump_json()))
    study.set_user_attr("baselines", {})


def stored_study_config(config: SearchConfig) -> dict[str, Any] | None:
    """The config stored by an existing study of this name (read-only), or None when there is none."""
    if config.storage is None and not (config.run_dir / "study.db").is_file():
        return None
    try:
        storage = RDBStorage(config.storage_url, skip_table_creation=True)
        return optuna.load_study(study_name=config.study, storage=storage).user_attrs.get("config")
    except Exception:  # no such study (or no reachable storage): nothing to compare with
        return None


def set_aside_study(config: SearchConfig) -> Path | None:
    """Make room for a new study: the default SQLite file (with its WAL files) is renamed, never deleted;
    a study of this name in a given storage is refused, as it cannot be moved."""
    if config.storage is not None:
        if stored_study_config(config) is not None:
            raise EvomergeError(f"--new-study: {public_url(config.storage_url)} already holds study {config.study!r}, "
                                "which is never removed: give a new --study-name")
        return None
    db = config.run_dir / "study.db"
    if not db.is_file():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    moved = db.with_name(f"study-{stamp}.db")
    for n in range(2, 1000):  # a second new study within the same second must not replace the first one
        if not any(Path(f"{moved}{suffix}").exists() for suffix in ("", "-wal", "-shm")):
            break
        moved = db.with_name(f"study-{stamp}-{n}.db")
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{db}{suffix}").exists():
            os.replace(f"{db}{suffix}", f"{moved}{suffix}")
    print(f"previous study moved to {moved} (its report: evomerge report {config.run_dir} "
          f"--storage sqlite:///{moved.as_posix()})", flush=True)
    return moved


def public_url(url: str) -> str:
    """The storage URL without its password, fit to print and to write into recipes."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def create_study(config: SearchConfig, bench: Workbench, rerun: str = "check") -> optuna.Study:
    storage = open_storage(config)
    directions = ["maximize"] * len(config.objective_groups)
    try:
        study = optuna.create_study(study_name=config.study, storage=storage, directions=directions,
                                    sampler=make_sampler(config, bench.dims), pruner=make_pruner(config),
                                    load_if_exists=True)
    except ValueError as exc:  # a stored study with another number of objectives
        raise changed_config_error(config, [str(exc).splitlines()[0]]) from None
    if "config" not in study.user_attrs:
        study.set_user_attr("config", json.loads(config.model_dump_json()))
        study.set_user_attr("evomerge_version", _version())
        if "handwritten" in config.warm_start and bench.routing is not None:
            study.enqueue_trial(bench.routing.start_point(), user_attrs={"handwritten": True}, skip_if_exists=True)
        elif "handwritten" in config.warm_start:  # one per method, so each method starts from the same place
            for method in config.methods:
                study.enqueue_trial(handwritten_point(config, bench.dims, method), user_attrs={"handwritten": True},
                                    skip_if_exists=True)
    else:
        reconcile_config(study, config, rerun)
    return study


def _version() -> str:
    from importlib.metadata import version

    return version("evomerge")


def _new_paths(config: SearchConfig) -> list[Path]:
    """The run directory levels and SQLite files a start would create: what a failed start removes."""
    db = sqlite_file(config.storage_url)
    made = config.run_dir if config.storage is None else db.parent if db is not None else None
    paths = [p for p in ([made, *made.parents] if made else []) if not p.exists()]
    if db is not None and not db.exists():
        paths = [db, Path(f"{db}-wal"), Path(f"{db}-shm"), *paths]
    return paths


def _fresh(study: optuna.Study | None, config: SearchConfig, created: list[Path]) -> bool:
    """Whether a failed start made the study: it created its database, or the study has not run a trial
    (only the enqueued hand-written one waits), so nothing but the stored config would be lost."""
    if study is None or sqlite_file(config.storage_url) in created:
        return True
    try:
        return all(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False))
    except Exception:
        return False


def _discard(study: optuna.Study | None, config: SearchConfig, created: list[Path]) -> None:
    """Undo a failed start: delete the study it created and the files and directories it made."""
    backend = rdb_backend(study) if study is not None else None
    if study is not None:
        with contextlib.suppress(Exception):  # the storage may be what failed: its new file goes below
            optuna.delete_study(study_name=study.study_name, storage=storage_of(study))
    if backend is not None:
        backend.engine.dispose()
    for path in created:  # files first, then directories from the deepest
        with contextlib.suppress(OSError):
            path.rmdir() if path.is_dir() else path.unlink(missing_ok=True)


def _storage_failure(config: SearchConfig, exc: BaseException) -> EvomergeError:
    return EvomergeError(f"storage {config.storage_url}: {root_cause(exc)}")


def _check_repeated_failure(recent: list[str], frozen: optuna.trial.FrozenTrial) -> None:
    """Stop when the last ``REPEATED_FAILURES`` candidates failed for one and the same reason."""
    if frozen.state != TrialState.FAIL:
        recent.clear()
        return
    recent.append(frozen.user_attrs.get("fail_reason", "?"))
    del recent[:-REPEATED_FAILURES]
    if len(recent) == REPEATED_FAILURES and len(set(recent)) == 1:
        raise EvomergeError(f"stopped: the last {REPEATED_FAILURES} candidates all failed with {recent[0]}")


def search(config: SearchConfig, *, config_dir: Path | None = None, evaluator=None, progress: bool = True,
           on_trial=None, rerun: str = "check") -> optuna.Study:
    """Run (or resume) the study until its budget is spent or the user stops it. ``rerun`` says what a study
    stored with a different config gets (see ``reconcile_config``): ``check`` (stop), ``new``, ``continue``.

    Everything ``evomerge validate`` checks is checked before the storage is touched; a start that fails
    later (a baseline that cannot be scored) leaves no study, file or directory it created behind."""
    if rerun not in RERUN_CHOICES:
        raise EvomergeError(f"rerun must be one of {', '.join(RERUN_CHOICES)}, got {rerun!r}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = self_contained(config, config_dir)
    evaluator = preflight(config, config_dir, evaluator).evaluator
    bench = open_workbench(config, config_dir, evaluator)
    if rerun == "new":
        set_aside_study(config)
    created, study = _new_paths(config), None
    try:
        study = create_study(config, bench, rerun)
        fail_orphaned_trials(study, config.grace_seconds)
        baselines = score_baselines(study, bench)
        add_source_trials(study, bench, baselines)
    except Exception as exc:
        if _fresh(study, config, created):
            _discard(study, config, created)
        if isinstance(exc, STORAGE_ERRORS):
            raise _storage_failure(config, exc) from None
        if isinstance(exc, EvomergeError):
            raise
        raise EvomergeError(f"scoring the baselines failed: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    try:
        return _optimize(study, bench, config, baselines, progress, on_trial)
    except STORAGE_ERRORS as exc:
        raise _storage_failure(config, exc) from None


def _optimize(study: optuna.Study, bench: Workbench, config: SearchConfig, baselines: dict[str, Any],
              progress: bool, on_trial) -> optuna.Study:
    stop = _StopFlag()
    failures: list[str] = []
    previous = signal.signal(signal.SIGINT, stop)
    started = time.monotonic()
    try:
        with _Progress(progress, config, baselines) as report:
            done, read_at = done_trials(study), time.monotonic()
            checked_at = read_at
            while not stop.requested:
                if time.monotonic() - checked_at >= config.heartbeat_seconds:
                    fail_orphaned_trials(study, config.grace_seconds)  # dead workers' trials, during the run
                    checked_at, read_at = time.monotonic(), 0.0
                if not budget_left(done, config, started):
                    fail_orphaned_trials(study, config.grace_seconds)
                    done = done_trials(study)  # what was read last may be stale: confirm before stopping
                    if not budget_left(done, config, started):
                        if _timed_out(config, started) or not _others_running(done):
                            break
                        time.sleep(REFRESH_SECONDS)  # until those trials end, or their workers die
                        continue
                refresh = time.monotonic() - read_at >= REFRESH_SECONDS
                frozen, done = run_trial(study, bench, done, refresh)
                read_at = time.monotonic() if refresh else read_at
                if frozen is None:
                    continue  # another worker took the last slot; it may yet die
                report(done, frozen)
                if on_trial:
                    on_trial(study, frozen)
                _check_repeated_failure(failures, frozen)
    finally:
        signal.signal(signal.SIGINT, previous)
    return study


class _Progress:
    """A rich progress bar: trials done, the best so far and its difference to the best model it started from."""

    def __init__(self, enabled: bool, config: SearchConfig, baselines: dict[str, Any]):
        self.enabled = enabled
        self.config = config
        self.reference = max(((b["objective"], label) for label, b in baselines.items()), default=None)
        self.baseline_text = ("" if self.reference is None else
                              f"best of base and sources: {self.reference[1]} {self.reference[0]:.3f}")

    def __enter__(self):
        if not self.enabled:
            return lambda done, frozen: None
        self.bar = progress_bar("search", "status")
        self.bar.__enter__()
        total = self.config.n_trials
        self.task = self.bar.add_task("search", total=total, status=self.baseline_text)
        return self.update

    def update(self, done: list[optuna.trial.FrozenTrial], frozen) -> None:
        self.bar.update(self.task, completed=len(done), status=progress_status(done, frozen, self.reference))

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False


def progress_status(done: list[optuna.trial.FrozenTrial], frozen, reference: tuple[float, str] | None) -> str:
    """``best 0.16113 (+0.0012 vs base 0.15993) · trial 7: 0.15871``: as many decimals as it takes to tell
    the best, the reference and the last trial apart, and the difference with two significant digits."""
    from search.formatting import decimals_for_differences, decimals_to_separate

    complete = [t for t in done if t.state == TrialState.COMPLETE]
    feasible = [t for t in complete if t.user_attrs.get("feasible", True)]
    best = max((rank_value(t) for t in feasible or complete), default=float("nan"))
    last = rank_value(frozen) if frozen.state == TrialState.COMPLETE else None
    shown = [best, *([reference[0]] if reference else []), *([last] if last is not None else [])]
    d = decimals_to_separate(shown)
    text = f"best {best:.{d}f}"
    if reference is not None and best == best:
        delta = best - reference[0]
        text += f" ({delta:+.{decimals_for_differences([delta])}f} vs {reference[1]} {reference[0]:.{d}f})"
    if len(feasible) < len(complete) or (complete and "feasible" in complete[0].user_attrs):
        text += f" · {len(feasible)}/{len(complete)} feasible"
    if frozen.state == TrialState.PRUNED:
        outcome = f"pruned after rung {frozen.user_attrs.get('rung', 0) + 1}"
    else:
        outcome = f"{last:.{d}f}" if last is not None else f"failed ({frozen.user_attrs.get('fail_reason', '?')})"
        outcome += " (infeasible)" if frozen.user_attrs.get("feasible") is False else ""
    return text + f" · trial {frozen.number}: " + outcome


def _routing_text(config: SearchConfig, dims: list[Dimension]) -> str:
    spec = config.routing
    if not config.routing_only:
        return (f"then layer paths through {', '.join(spec.sources or config.models)} "
                f"({spec.n_trials or config.n_trials} trials, study {config.study}-routing)")
    slots = sum(d.param == "keep" for d in dims)
    scale = f", scale [{spec.scale.low}, {spec.scale.high}]" if spec.scale else ""
    return f"{slots} candidate slots, paths of {spec.min_layers}..{spec.max_layers or slots} layers{scale}"


def _constraint_text(c) -> str:
    slack = (f", tolerance {c.tolerance:g}" if c.tolerance else "") + (f", ratio {c.ratio:g}" if c.ratio != 1 else "")
    return f"{c.task}{' ' + c.metric if c.metric else ''} no worse than {c.no_worse_than}{slack}"


def check_config(config: SearchConfig, config_dir: Path | None = None, rerun: str = "check") -> dict[str, Any]:
    """What ``evomerge validate`` checks without running (``search.preflight``, the checks ``search`` runs
    before touching its storage), and that an existing study of this name was made with this config (as
    ``search`` would check). Returns a summary for display."""
    config = self_contained(config, config_dir)
    checked = preflight(config, config_dir)
    evaluator = checked.evaluator
    stored = stored_study_config(config) if rerun == "check" else None
    changes = config_differences(stored, config) if stored else []
    if changes:
        raise changed_config_error(config, changes)
    return {"models": checked.paths, "layers": checked.num_layers, "dimensions": [d.key for d in checked.dims],
            "tensors": checked.tensors,
            "tasks": list(getattr(evaluator, "task_names", [t.name for t in config.tasks])),
            "methods": ["layer paths (passthrough)"] if config.routing_only else config.methods,
            **({"routing": _routing_text(config, checked.dims)} if config.routing is not None else {}),
            "objective": describe_objective(config),
            "objectives": [f"{name}: {', '.join(tasks)}" for name, tasks in config.objective_groups],
            "constraints": [_constraint_text(c) for c in config.constraints] or "none",
            "storage": config.storage_url, "sampler": config.sampler_name, "n_trials": config.n_trials,
            "fidelity": None if config.fidelity is None else
            f"rungs {config.fidelity.rungs}, {config.fidelity.pruner} (η = {config.fidelity.reduction_factor})"}
