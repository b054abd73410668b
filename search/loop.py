"""The search loop: Optuna ask/tell over recipes materialized in memory into one live model.

Recipe (from the sampler's point) → ``merge_into`` writes the tensors into the live model → the evaluator
returns ``Scores`` → their weighted average is told to Optuna. Sources are read once; nothing is written
to disk per trial. The study lives in an RDB storage (SQLite by default, PostgreSQL for several
workers), so a search resumes after a crash and several processes can share one study.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.distributions import FloatDistribution
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import TrialState
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError, ProgrammingError
from sqlalchemy.engine import Engine

from merge_core.architecture import count_layers
from merge_core.checkpoint import CheckpointReader
from merge_core.engine import merge_into, resolve_model_path
from merge_core.errors import EvomergeError
from merge_core.memory import TensorSource
from merge_core.recipe import load_recipe
from search.config import SearchConfig
from search.space import Dimension, build_recipe, dimensions, handwritten_point, model_labels

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 40
MAX_RETRY = 2
REFRESH_SECONDS = 1.0  # how often a worker reads other workers' trials for its budget check and progress bar
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Whole-tensor precomputations a search keeps (task vectors, plus sorted magnitudes for float32): all of a
# small family's, about half of three 1B bf16 fine-tunes' task vectors; the rest streams per trial.
PRECOMPUTE_BYTES = 4 << 30


@event.listens_for(Engine, "connect")
def _sqlite_write_ahead_log(dbapi_connection, _record) -> None:
    """SQLite commits without an fsync each (WAL, synchronous=NORMAL): a trial makes a dozen small writes,
    which otherwise cost more than scoring a small model. Committed data survives a crashed process."""
    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def open_storage(config: SearchConfig) -> RDBStorage:
    """An RDB storage with heartbeats, so trials of a killed worker are failed and retried."""
    if config.storage is None:
        config.run_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(5):
        try:
            return RDBStorage(config.storage_url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
        except (IntegrityError, ProgrammingError):
            if attempt == 4:
                raise EvomergeError(f"storage {config.storage_url}: could not create Optuna's tables") from None
            time.sleep(0.5 + random.random())  # workers started together race to create the schema
        except Exception as exc:
            raise EvomergeError(f"storage {config.storage_url}: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0]}") from None


class _KnownSpaceCmaEsSampler(optuna.samplers.CmaEsSampler):
    """CMA-ES over the search's own dimensions. The stock sampler infers the space on every ask as the
    intersection of all past trials' parameters, a full read of the study costing as much as a small
    model's materialization; a search's space is fixed by its config (sorted by name, as Optuna's)."""

    def __init__(self, dims: list[Dimension], **kwargs):
        super().__init__(**kwargs)
        self._space = {d.key: FloatDistribution(d.low, d.high) for d in sorted(dims, key=lambda d: d.key)
                       if d.low < d.high}

    def infer_relative_search_space(self, study, trial) -> dict[str, FloatDistribution]:
        return dict(self._space)


def make_sampler(config: SearchConfig, dims: list[Dimension]) -> optuna.samplers.BaseSampler:
    if config.sampler == "cmaes":
        import cmaes  # noqa: F401  imported now (0.7 s, it pulls scipy.stats), not inside the first trial's ask
        return _KnownSpaceCmaEsSampler(dims, seed=config.seed, warn_independent_sampling=False)
    if config.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=config.seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=config.seed)


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


def fail_orphaned_trials(study: optuna.Study) -> None:
    """Fail (and so retry) RUNNING trials of dead workers on this host at once, without waiting for the
    heartbeat grace period; trials of other hosts are left to Optuna's stale-heartbeat check."""
    host = socket.gethostname()
    storage = study._storage
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", "")
        worker_host, _, pid = worker.rpartition(":")
        if worker_host == host and pid.isdigit() and not _alive(int(pid)):
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", f"worker {worker} died")
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, storage.get_trial(trial._trial_id))
    optuna.storages.fail_stale_trials(study)


def done_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Complete and running trials: what counts against the budget."""
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))


def budget_left(done: list[optuna.trial.FrozenTrial], config: SearchConfig, started: float) -> bool:
    if config.timeout is not None and time.monotonic() - started >= config.timeout:
        return False
    return config.n_trials is None or len(done) < config.n_trials


@dataclass
class Workbench:
    """Everything loaded once per search: sources in memory, the live model, its tokenizer, the evaluator."""

    config: SearchConfig
    paths: dict[str, str]
    sources: dict[str, TensorSource]
    model: Any
    tokenizer: Any
    evaluator: Any
    num_layers: int
    dims: list[Dimension] = field(default_factory=list)
    cache: dict = field(default_factory=dict)

    def recipe(self, values: dict[str, float], *, portable: bool = False) -> dict[str, Any]:
        """The candidate's recipe; ``portable`` spells model paths out and records the seed, for export."""
        recipe = build_recipe(self.config, self.dims, values, self.num_layers, self.paths if portable else None)
        if portable:
            recipe["evomerge"] = {"version": _version(), "seed": self.config.seed}
        return recipe

    def materialize(self, recipe: dict[str, Any]) -> None:
        merge_into(self.model, load_recipe(recipe), self.sources, device=self.config.device, seed=self.config.seed,
                   cache=self.cache, precompute_bytes=PRECOMPUTE_BYTES)

    def load_source(self, ref: str) -> None:
        """Put one source model's own weights into the live model (for baselines)."""
        state = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in state.items():
                source = self.sources[ref]
                if source.has(name):
                    tensor.copy_(source.get(name))


def resolve_paths(config: SearchConfig, config_dir: Path | None) -> dict[str, str]:
    return {ref: str(resolve_model_path(ref, config_dir)) for ref in [config.base_model, *config.models]}


def self_contained(config: SearchConfig, config_dir: Path | None) -> SearchConfig:
    """The config with local paths made absolute (from the CWD, else the config's directory), so the
    study's stored copy works for reports and workers started from anywhere."""
    def local(path: str | None) -> str | None:
        if path is None or Path(path).is_absolute():
            return path
        for candidate in (Path(path), (config_dir / path) if config_dir else None):
            if candidate is not None and candidate.exists():
                return str(candidate.resolve())
        return path

    return config.model_copy(update={"base_model": local(config.base_model),
                                     "models": [local(m) for m in config.models],
                                     "include_path": local(config.include_path)})


def build_evaluator(config: SearchConfig, split: str = "search"):
    from evaluators import LmEvalEvaluator

    return LmEvalEvaluator([t.name for t in config.tasks], include_path=config.include_path, split=split,
                           limit=config.limit, num_fewshot=config.num_fewshot, batch_size=config.batch_size,
                           device=config.device, threads=config.threads)


def open_workbench(config: SearchConfig, config_dir: Path | None = None, evaluator=None) -> Workbench:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = resolve_paths(config, config_dir)
    dtype = DTYPES[config.dtype]
    readers = {ref: CheckpointReader(path) for ref, path in paths.items()}
    base = readers[config.base_model]
    num_layers = count_layers(base.names, base.config, config.base_model)
    sources = {ref: TensorSource.load(r, dtype=dtype, device=config.device) for ref, r in readers.items()}
    model = AutoModelForCausalLM.from_pretrained(paths[config.base_model], dtype=dtype).to(config.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(paths[config.base_model])
    bench = Workbench(config, paths, sources, model, tokenizer, evaluator or build_evaluator(config), num_layers)
    bench.dims = dimensions(config, num_layers)
    return bench


def objective_of(scores, config: SearchConfig) -> float:
    from evaluators import weighted_average

    return weighted_average(scores, {t.name: t.weight for t in config.tasks},
                            {t.name: t.metric for t in config.tasks if t.metric})


def check_objective(config: SearchConfig, evaluator: Any) -> None:
    """Every task's objective metric exists and can enter the objective, checked from the tasks' definitions
    before any model is scored (``validate`` and ``search`` alike). Evaluators that cannot say their metrics
    before scoring (``metric_directions``) are checked on the first scores instead."""
    from evaluators.base import check_objective_metric

    directions = getattr(evaluator, "metric_directions", None)
    if directions is None:
        return
    known = directions()
    for task in config.tasks:
        if task.name not in known:
            continue  # a group name: its member tasks are what the evaluator scores
        metrics = known[task.name]
        metric = task.metric or next(iter(metrics))
        if metric not in metrics:
            raise EvomergeError(f"tasks: {task.name!r} has no metric {metric!r} (it has: {', '.join(metrics)})")
        check_objective_metric(task.name, metric, metrics[metric])


def score_baselines(study: optuna.Study, bench: Workbench) -> dict[str, Any]:
    """Score the base and every source once per study, with the settings every trial gets."""
    baselines = dict(study.user_attrs.get("baselines", {}))
    labels = model_labels([bench.config.base_model, *bench.config.models])
    for ref in [bench.config.base_model, *bench.config.models]:
        label = labels[ref]
        if label in baselines:
            continue
        bench.load_source(ref)
        scores = bench.evaluator.score(bench.model, bench.tokenizer)
        baselines[label] = {"model": bench.paths[ref], "is_base": ref == bench.config.base_model,
                            "objective": objective_of(scores, bench.config), "scores": scores.to_dict()}
        study.set_user_attr("baselines", baselines)
    return baselines


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
    trial = study.ask()
    reaches_budget = bench.config.n_trials is not None and trial.number >= bench.config.n_trials
    done = done_trials(study) if refresh or reaches_budget else known
    if _surplus(done, trial, bench.config):
        _set_user_attrs(study, trial, {"worker": _worker_id(), "surplus": True})
        study.tell(trial, state=TrialState.PRUNED)
        return None, done
    frozen = _score_trial(study, trial, bench)
    others = [t for t in done if t.number != frozen.number]
    return frozen, (others + [frozen] if frozen.state == TrialState.COMPLETE else others)


def _score_trial(study: optuna.Study, trial: optuna.Trial, bench: Workbench) -> optuna.trial.FrozenTrial:
    with get_heartbeat_thread(trial._trial_id, study._storage):
        try:
            values = {d.key: trial.suggest_float(d.key, d.low, d.high) for d in bench.dims}
            recipe = bench.recipe(values)
            _set_user_attrs(study, trial, {"worker": _worker_id(), "recipe": bench.recipe(values, portable=True)})
            started = time.perf_counter()
            bench.materialize(recipe)
            merged = time.perf_counter()
            scores = bench.evaluator.score(bench.model, bench.tokenizer)
            value = objective_of(scores, bench.config)
            _set_user_attrs(study, trial, {"scores": scores.to_dict(), "materialize_seconds": merged - started,
                                           "eval_seconds": time.perf_counter() - merged})
            if value != value:
                raise EvomergeError("the objective is NaN")
            return study.tell(trial, value)
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            study.tell(trial, state=TrialState.FAIL)
            raise
        except (Exception, MemoryError) as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            trial.set_user_attr("fail_reason", reason)
            return study.tell(trial, state=TrialState.FAIL)


def _set_user_attrs(study: optuna.Study, trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """Several user attributes in one RDB transaction: a commit each costs more than a small model's
    materialization. (Optuna has no public batch call; other storages get one call per attribute.)"""
    backend = getattr(study._storage, "_backend", None)
    if not isinstance(backend, RDBStorage):
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    from optuna.storages._rdb.models import TrialUserAttributeModel
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(backend.scoped_session, True) as session:
        for key, value in attrs.items():
            backend._set_trial_attr_without_commit(session, TrialUserAttributeModel, trial._trial_id, key, value)


# Config fields a rerun may change and still continue its study: the budget and where and how it runs.
# Every other field (method, models, base, parameters, fixed, tasks and metrics, limit, num_fewshot, dtype,
# seed, block size, include path, and fields added later) changes the objective or the space.
RERUN_FREE_FIELDS = frozenset({"n_trials", "timeout", "threads", "batch_size", "device", "sampler", "storage",
                               "study_name", "output_dir", "name"})
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
        f"study {config.study!r} in {public_url(config.storage_url)} was made with another config ({'; '.join(changes)}): "
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
    if rerun == "new":
        set_aside_study(config)
    storage = open_storage(config)
    handwritten = handwritten_point(config, bench.dims)
    study = optuna.create_study(study_name=config.study, storage=storage, direction="maximize",
                                sampler=make_sampler(config, bench.dims), load_if_exists=True)
    if "config" not in study.user_attrs:
        study.set_user_attr("config", json.loads(config.model_dump_json()))
        study.set_user_attr("evomerge_version", _version())
        study.enqueue_trial(handwritten, user_attrs={"handwritten": True}, skip_if_exists=True)
    else:
        reconcile_config(study, config, rerun)
    return study


def _version() -> str:
    from importlib.metadata import version

    return version("evomerge")


def search(config: SearchConfig, *, config_dir: Path | None = None, evaluator=None, progress: bool = True,
           on_trial=None, rerun: str = "check") -> optuna.Study:
    """Run (or resume) the study until its budget is spent or the user stops it. ``rerun`` says what a study
    stored with a different config gets (see ``reconcile_config``): ``check`` (stop), ``new``, ``continue``."""
    if rerun not in RERUN_CHOICES:
        raise EvomergeError(f"rerun must be one of {', '.join(RERUN_CHOICES)}, got {rerun!r}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = self_contained(config, config_dir)
    bench = open_workbench(config, config_dir, evaluator)
    check_objective(config, bench.evaluator)
    study = create_study(config, bench, rerun)
    fail_orphaned_trials(study)
    baselines = score_baselines(study, bench)
    stop = _StopFlag()
    previous = signal.signal(signal.SIGINT, stop)
    started = time.monotonic()
    try:
        with _progress(progress, config, baselines) as report:
            done, read_at = done_trials(study), time.monotonic()
            while not stop.requested:
                if not budget_left(done, config, started):
                    done = done_trials(study)  # what was read last may be stale: confirm before stopping
                    if not budget_left(done, config, started):
                        break
                refresh = time.monotonic() - read_at >= REFRESH_SECONDS
                frozen, done = run_trial(study, bench, done, refresh)
                read_at = time.monotonic() if refresh else read_at
                if frozen is None:
                    break
                report(done, frozen)
                if on_trial:
                    on_trial(study, frozen)
    finally:
        signal.signal(signal.SIGINT, previous)
    return study


class _progress:
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
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("[bold]search"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.fields[status]}"))
        self.bar.__enter__()
        total = self.config.n_trials
        self.task = self.bar.add_task("search", total=total, status=self.baseline_text)
        return self.update

    def update(self, done: list[optuna.trial.FrozenTrial], frozen) -> None:
        self.bar.update(self.task, completed=sum(t.state == TrialState.COMPLETE for t in done),
                        status=progress_status(done, frozen, self.reference))

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False


def progress_status(done: list[optuna.trial.FrozenTrial], frozen, reference: tuple[float, str] | None) -> str:
    """``best 0.16113 (+0.0012 vs base 0.15993) · trial 7: 0.15871``: as many decimals as it takes to tell
    the best, the reference and the last trial apart, and the difference with two significant digits."""
    from search.formatting import decimals_for_differences, decimals_to_separate

    complete = [t.value for t in done if t.state == TrialState.COMPLETE]
    best = max(complete, default=float("nan"))
    last = frozen.value if frozen.state == TrialState.COMPLETE else None
    shown = [best, *([reference[0]] if reference else []), *([last] if last is not None else [])]
    d = decimals_to_separate(shown)
    text = f"best {best:.{d}f}"
    if reference is not None and best == best:
        delta = best - reference[0]
        text += f" ({delta:+.{decimals_for_differences([delta])}f} vs {reference[1]} {reference[0]:.{d}f})"
    return text + f" · trial {frozen.number}: " + (
        f"{last:.{d}f}" if last is not None else f"failed ({frozen.user_attrs.get('fail_reason', '?')})")


def check_config(config: SearchConfig, config_dir: Path | None = None, rerun: str = "check") -> dict[str, Any]:
    """What ``evomerge validate`` checks without running: models exist and are compatible (the hand-written
    recipe plans cleanly), every task builds and its objective metric can enter the objective, and an
    existing study of this name was made with this config (as ``search`` would check). Returns a summary."""
    from merge_core.plan import plan_merge

    paths = resolve_paths(config, config_dir)
    readers = {ref: CheckpointReader(path) for ref, path in paths.items()}
    base = readers[config.base_model]
    num_layers = count_layers(base.names, base.config, config.base_model)
    dims = dimensions(config, num_layers)
    recipe = build_recipe(config, dims, handwritten_point(config, dims), num_layers)
    plan = plan_merge(load_recipe(recipe), readers)
    evaluator = build_evaluator(config)
    check_objective(config, evaluator)
    portable = self_contained(config, config_dir)
    stored = stored_study_config(portable) if rerun == "check" else None
    changes = config_differences(stored, portable) if stored else []
    if changes:
        raise changed_config_error(config, changes)
    return {"models": paths, "layers": num_layers, "dimensions": [d.key for d in dims],
            "tensors": len(plan.jobs), "tasks": list(getattr(evaluator, "task_names", [t.name for t in config.tasks])),
            "storage": config.storage_url, "sampler": config.sampler, "n_trials": config.n_trials}
