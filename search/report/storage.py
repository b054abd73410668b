"""Reading a study: the storage opened read-only, the study checked to be evomerge's, its config and trials."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from merge_core.adapters import resolve_source
from merge_core.errors import EvomergeError
from merge_core.recipe import validate
from search.config import SearchConfig
from search.loop import public_url, rank_key
from search.space import model_labels

__all__ = ["SQLITE_HEADER", "close_storage", "completed_trials", "load_evomerge_study", "open_storage_read_only",
           "open_study", "parse_storage_url", "sqlite_file", "study_config"]

SQLITE_HEADER = b"SQLite format 3\x00"


def parse_storage_url(url: str):
    """The storage URL parsed (SQLAlchemy's ``URL``), or a one-line error for one that is not a URL at all."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError, TypeError):
        raise EvomergeError(f"storage {url!r}: not a database URL (e.g. sqlite:///path/study.db or "
                            f"postgresql://user@host/db)") from None


def sqlite_file(url: str) -> Path | None:
    parsed = parse_storage_url(url)
    return Path(parsed.database) if parsed.drivername.startswith("sqlite") and parsed.database else None


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain: Optuna wraps a driver's refusal ("file is not a database") in a
    generic commit error that names no cause."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    return exc


def close_storage(rdb: RDBStorage | None) -> None:
    """Close the storage's connections: SQLite then removes its -wal/-shm files, leaving the run dir as it was."""
    if rdb is not None:
        rdb.remove_session()
        rdb.engine.dispose()


def open_study(run_dir: Path, storage: str, study_name: str | None = None) -> optuna.Study:
    """The run's study, opened read-only: no table creation, no heartbeat, no stale-trial handling."""
    rdb = open_storage_read_only(run_dir, storage)
    try:
        return load_evomerge_study(rdb, storage, study_name)
    except EvomergeError:
        close_storage(rdb)
        raise


def open_storage_read_only(run_dir: Path, storage: str) -> RDBStorage:
    """The storage, without creating tables (or, for SQLite, a database file where there was none)."""
    shown = public_url(storage)
    db_file = sqlite_file(storage)
    if db_file is not None and not db_file.is_file():  # SQLAlchemy would create an empty database
        raise EvomergeError(f"{run_dir}: no study here ({db_file} does not exist; give --storage)")
    if db_file is not None:  # refused before SQLite opens it, which would turn it into a WAL database
        with open(db_file, "rb") as handle:
            head = handle.read(len(SQLITE_HEADER))
        if head != SQLITE_HEADER:
            raise EvomergeError(f"{run_dir}: no study here ({db_file} is "
                                f"{'empty' if not head else 'not an SQLite database'})")
    rdb = None
    try:
        rdb = RDBStorage(storage, skip_table_creation=True)
        rdb.get_all_studies()
    except Exception as exc:
        close_storage(rdb)
        cause = _root_cause(exc)
        raise EvomergeError(f"storage {shown}: {type(cause).__name__}: "
                            f"{(str(cause).splitlines() or [''])[0]}") from None
    return rdb


def load_evomerge_study(rdb: RDBStorage, storage: str, study_name: str | None) -> optuna.Study:
    """The study ``study_name`` (default: the storage's only one), refused unless ``evomerge search`` made it."""
    shown = public_url(storage)
    names = [s.study_name for s in rdb.get_all_studies()]
    if not names:
        raise EvomergeError(f"storage {shown} holds no study")
    if study_name is None:
        if len(names) > 1:
            raise EvomergeError(f"storage {shown} holds several studies ({', '.join(names)}): give --study-name")
        study_name = names[0]
    elif study_name not in names:
        raise EvomergeError(f"storage {shown} has no study {study_name!r} (it has: {', '.join(names)})")
    study = optuna.load_study(study_name=study_name, storage=rdb)
    if "config" not in study.user_attrs:
        raise EvomergeError(f"study {study_name!r} was not made by evomerge search (it has no config)")
    return study


def study_config(study: optuna.Study) -> SearchConfig:
    """The search config with model refs replaced by the paths the search read (recorded with the baselines):
    refs may be relative to a config file the report does not know, and trial recipes name these paths."""
    config = validate(SearchConfig, study.user_attrs["config"], f"study {study.study_name!r}: stored config")
    baselines = study.user_attrs.get("baselines", {})
    labels = model_labels([config.base_model, *config.models])
    path = {ref: baselines[label]["model"] if label in baselines else resolve_source(ref)
            for ref, label in labels.items()}
    return config.model_copy(update={"base_model": path[config.base_model],
                                     "models": [path[m] for m in config.models]})


def completed_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Completed trials, best first by ``rank_value`` (ties: earliest first)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
                  for s in (TrialState.RUNNING, TrialState.FAIL)}
        raise EvomergeError(f"study {study.study_name!r} has no completed trial yet "
                            f"({counts['running']} running, {counts['fail']} failed)")
    return sorted(complete, key=rank_key)

