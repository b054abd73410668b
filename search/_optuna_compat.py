"""The one place that uses Optuna's private API; ``tests/test_compat.py`` fails loudly when it moves.

Needed for what Optuna offers no public call for: a heartbeat around a trial run outside
``Study.optimize`` (the loop asks and tells itself, to fail dead workers' trials and count the budget
across workers), the storage behind a study (to write a dead worker's trial state and to dispose of the
engine), and several user attributes in one RDB transaction.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import optuna
from optuna.storages import BaseStorage, RDBStorage

__all__ = ["heartbeat", "rdb_backend", "set_user_attrs_in_one_transaction", "storage_of", "trial_id"]


def storage_of(study: optuna.Study) -> BaseStorage:
    return study._storage


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    return trial._trial_id


def rdb_backend(study: optuna.Study) -> RDBStorage | None:
    """The RDB storage under Optuna's caching wrapper, or None for other storages."""
    storage = storage_of(study)
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, RDBStorage) else None


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """The trial's heartbeat while the block runs (a no-op for storages without heartbeats)."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    with get_heartbeat_thread(trial_id(trial), storage_of(study)):
        yield


def set_user_attrs_in_one_transaction(backend: RDBStorage, trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    from optuna.storages._rdb.models import TrialUserAttributeModel
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(backend.scoped_session, True) as session:
        for key, value in attrs.items():
            backend._set_trial_attr_without_commit(session, TrialUserAttributeModel, trial_id(trial), key, value)
