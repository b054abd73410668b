"""The private APIs of Optuna and lm-eval that the two adapter modules use still exist with the shapes
they rely on: an upgrade that moves one fails here, by name, not in the middle of a search."""

import inspect

import optuna
import pytest

from evaluators import _lm_eval_compat
from search import _optuna_compat


def test_optuna_private_api_the_adapter_uses_exists():
    from optuna.storages import _heartbeat
    from optuna.storages._rdb import models, storage

    assert callable(_heartbeat.get_heartbeat_thread)
    assert callable(storage._create_scoped_session)
    assert hasattr(models, "TrialUserAttributeModel")
    assert callable(optuna.storages.RDBStorage._set_trial_attr_without_commit)
    assert list(inspect.signature(optuna.storages.RDBStorage._set_trial_attr_without_commit).parameters)[:6] == [
        "self", "session", "model_cls", "trial_id", "key", "value"]


def test_the_optuna_adapter_reaches_a_studys_storage_trial_ids_and_writes_attrs_in_one_transaction(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    assert _optuna_compat.rdb_backend(study) is storage
    assert _optuna_compat.storage_of(study).get_trial(_optuna_compat.trial_id(trial)).number == trial.number
    _optuna_compat.set_user_attrs_in_one_transaction(storage, trial, {"a": 1, "b": [2, 3]})
    with _optuna_compat.heartbeat(study, trial):
        pass
    assert storage.get_trial(_optuna_compat.trial_id(trial)).user_attrs == {"a": 1, "b": [2, 3]}
    assert _optuna_compat.rdb_backend(optuna.create_study()) is None  # in-memory: no RDB


def test_lm_eval_private_api_the_adapter_uses_exists(tmp_path):
    from lm_eval import utils
    from lm_eval.tasks._index import Kind

    assert {"TAG", "TASK"} <= set(Kind.__members__)
    assert callable(utils.env.from_string)
    _lm_eval_compat.cache_prompt_templates()
    assert hasattr(utils.env.from_string, "cache_info")


def test_the_lm_eval_adapter_reads_filters_and_index_kinds_of_real_tasks():
    from evaluators.tasks import DEFAULT_INCLUDE_PATH, build_tasks, task_manager

    task = build_tasks(["zoo_rev"], DEFAULT_INCLUDE_PATH, "test")["zoo_rev"]
    assert _lm_eval_compat.filter_names(task) == ["none"]
    manager = task_manager((str(DEFAULT_INCLUDE_PATH),))
    assert _lm_eval_compat.is_yaml_task(manager.task_index["zoo_rev"])
    assert not _lm_eval_compat.is_tag(manager.task_index["zoo_rev"])


@pytest.mark.parametrize("module", [_optuna_compat, _lm_eval_compat])
def test_adapters_declare_what_they_offer(module):
    assert module.__all__ and all(callable(getattr(module, name)) for name in module.__all__)
