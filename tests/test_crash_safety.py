"""Crash safety of the search: real worker processes (tests/crash_worker.py) killed with -9 or interrupted
at chosen moments, alone or beside another worker on SQLite and PostgreSQL. Whatever happens, the study
ends with exactly ``n_trials`` complete trials, each parameter set once, and every trial a dead or
interrupted worker held is retried with the same parameters: none lost, none duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from search.config import SearchConfig
from search.loop import search
from tests.crash_worker import GateEvaluator
from tests.families import make_family
from tests.postgres import find_bin, postgres_server

pytestmark = pytest.mark.slow  # trains the demo family, runs searches or worker processes

ROOT = Path(__file__).resolve().parent.parent
BASELINES = 3  # scoring calls before the first trial: the base and two fine-tunes
STUDY = "crash"


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return {k: str(v) for k, v in make_family(tmp_path_factory.mktemp("crash"), "llama", n_finetunes=2).items()}


def config_data(fam, tmp_path: Path, storage: str, n_trials: int) -> dict:
    return {"name": STUDY, "base_model": fam["base"], "models": [fam["ft1"], fam["ft2"]],
            "method": "task_arithmetic", "parameters": {"weight": {"low": 0.0, "high": 1.5}},
            "tasks": [{"name": "closeness"}], "include_path": None, "n_trials": n_trials, "storage": storage,
            "output_dir": str(tmp_path / "run"), "heartbeat_seconds": 1, "grace_seconds": 60}


class Worker:
    """One `search` process; ``hold_at`` makes it wait inside that scoring call (see tests/crash_worker.py)."""

    def __init__(self, config: Path, gate: Path, hold_at: int | None = None):
        gate.mkdir(exist_ok=True)
        self.gate = gate
        self.out = (gate / f"out.{time.monotonic_ns()}").open("w+")
        path = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
        args = [sys.executable, "-m", "tests.crash_worker", str(config), str(gate)]
        args += [str(hold_at)] if hold_at else []
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self.out, stderr=subprocess.STDOUT, text=True)
        self.pid = self.proc.pid

    def output(self) -> str:
        self.out.flush()
        return Path(self.out.name).read_text()

    def wait_until(self, condition, what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}) before {what}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker never reached {what}:\n{self.output()}")
            time.sleep(0.05)

    def wait_held(self) -> None:
        self.wait_until((self.gate / f"held.{self.pid}").exists, "its held scoring call")

    def release(self) -> None:
        (self.gate / f"release.{self.pid}").touch()

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()

    def finish(self, timeout: float = 300) -> int:
        self.proc.wait(timeout=timeout)
        return self.proc.returncode


def trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=STUDY, storage=storage).get_trials()


def snapshot(storage: str) -> tuple:
    """Everything a trial or the study records, for comparing the study before and after a read."""
    study = optuna.load_study(study_name=STUDY, storage=storage)
    return (study.user_attrs,
            [(t.number, t.state, t.params, t.values, t.user_attrs, t.system_attrs, t.datetime_complete)
             for t in study.get_trials()])


def assert_exact(storage: str, n_trials: int, lost: int = 0) -> list[optuna.trial.FrozenTrial]:
    """``n_trials`` complete, each parameter set once; each failed trial (``lost`` of them) retried with
    its parameters and completed; nothing left running or queued. Returns the failed trials."""
    final = trials(storage)
    complete = [t for t in final if t.state == TrialState.COMPLETE]
    failed = [t for t in final if t.state == TrialState.FAIL]
    assert len(complete) == n_trials
    assert not [t for t in final if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len({tuple(sorted(t.params.items())) for t in complete}) == n_trials, "a parameter set ran twice"
    assert len(failed) == lost
    for f in failed:
        retries = [t for t in complete if t.system_attrs.get("failed_trial") == f.number]
        assert len(retries) == 1 and retries[0].params == f.params, f"trial {f.number} was lost"
    assert len([t for t in complete if t.user_attrs.get("handwritten")]) == 1
    return failed


def test_kill_9_in_baselines_then_mid_search_loses_nothing_and_a_report_meanwhile_changes_nothing(fam, tmp_path):
    from search.report import write_report

    storage = f"sqlite:///{tmp_path}/study.db"
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(config_data(fam, tmp_path, storage, n_trials=6)))
    in_baselines = Worker(config, tmp_path / "gate", hold_at=2)
    in_baselines.wait_held()
    in_baselines.kill()
    study = optuna.load_study(study_name=STUDY, storage=storage)
    assert list(study.user_attrs["baselines"]) == ["base"], "killed while scoring the second baseline"
    assert [t.state for t in study.get_trials()] == [TrialState.WAITING]  # the handwritten recipe, queued

    mid_search = Worker(config, tmp_path / "gate", hold_at=2 + 3)  # the two baselines left, then trial 2
    mid_search.wait_held()
    before = snapshot(storage)
    assert [t[1] for t in before[1]] == [TrialState.COMPLETE] * 2 + [TrialState.RUNNING]
    assert set(before[0]["baselines"]) == {"base", "ft1", "ft2"}
    report = write_report(tmp_path / "run", storage=storage, evaluator=GateEvaluator(
        fam["base"], [fam["ft1"], fam["ft2"]], tmp_path))  # scores the leaderboard's test split too
    assert report.is_file() and snapshot(storage) == before
    mid_search.kill()

    rerun = Worker(config, tmp_path / "gate")
    assert rerun.finish() == 0, rerun.output()
    [killed] = assert_exact(storage, 6, lost=1)
    assert killed.number == 2 and killed.user_attrs["fail_reason"] == f"worker {killed.user_attrs['worker']} died"


def test_ctrl_c_finishes_the_trial_a_second_ctrl_c_queues_it_again_and_a_rerun_completes(fam, tmp_path):
    storage = f"sqlite:///{tmp_path}/study.db"
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(config_data(fam, tmp_path, storage, n_trials=6)))
    once = Worker(config, tmp_path / "gate", hold_at=BASELINES + 2)
    once.wait_held()
    once.proc.send_signal(signal.SIGINT)
    once.wait_until(lambda: "stopping after the current trial" in once.output(), "the first Ctrl-C")
    once.release()
    assert once.finish() == 0, once.output()
    assert [t.state for t in trials(storage)] == [TrialState.COMPLETE] * 2

    twice = Worker(config, tmp_path / "gate", hold_at=2)  # baselines are stored: calls are trials now
    twice.wait_held()
    twice.proc.send_signal(signal.SIGINT)
    twice.wait_until(lambda: "stopping after the current trial" in twice.output(), "the first Ctrl-C")
    twice.proc.send_signal(signal.SIGINT)
    assert twice.finish() == 130, twice.output()
    interrupted = trials(storage)[3]
    assert interrupted.state == TrialState.FAIL and interrupted.user_attrs["fail_reason"] == "interrupted"

    rerun = Worker(config, tmp_path / "gate")
    assert rerun.finish() == 0, rerun.output()
    assert [t.number for t in assert_exact(storage, 6, lost=1)] == [3]


@contextmanager
def _sqlite(tmp_path: Path):
    yield f"sqlite:///{tmp_path}/study.db"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_surviving_worker_completes_the_budget_when_another_dies_mid_run(fam, tmp_path, backend):
    if backend == "postgresql" and find_bin() is None and os.environ.get("CI") != "true":
        pytest.skip("PostgreSQL is not installed")
    with (postgres_server() if backend == "postgresql" else _sqlite(tmp_path)) as storage:
        config = tmp_path / "search.yaml"
        config.write_text(yaml.safe_dump(config_data(fam, tmp_path, storage, n_trials=8)))
        doomed = Worker(config, tmp_path / "gate", hold_at=BASELINES + 1)
        doomed.wait_held()  # in its first trial: alive when the survivor starts and fails dead workers' trials
        survivor = Worker(config, tmp_path / "gate")

        def survivor_is_searching() -> bool:
            return any(t.state == TrialState.COMPLETE and t.user_attrs["worker"].endswith(f":{survivor.pid}")
                       for t in trials(storage))

        survivor.wait_until(survivor_is_searching, "its first trial")
        doomed.kill()
        assert survivor.finish() == 0, survivor.output()
        [killed] = assert_exact(storage, 8, lost=1)
        assert killed.user_attrs["worker"].endswith(f":{doomed.pid}") and "died" in killed.user_attrs["fail_reason"]
        retry = [t for t in trials(storage) if t.system_attrs.get("failed_trial") == killed.number][0]
        assert retry.user_attrs["worker"].endswith(f":{survivor.pid}")


def test_a_trial_whose_heartbeat_stopped_on_another_host_is_retried_before_the_search_stops(fam, tmp_path):
    """A worker on another host cannot be checked by pid: its trial is failed once its heartbeat is older
    than the grace period, by the worker still running, which then runs the retry."""
    storage = f"sqlite:///{tmp_path}/study.db"
    config = SearchConfig.model_validate({**config_data(fam, tmp_path, storage, n_trials=3), "grace_seconds": 2})
    rdb = optuna.storages.RDBStorage(storage, heartbeat_interval=1, grace_period=2)
    elsewhere = optuna.create_study(study_name=STUDY, storage=rdb, direction="maximize").ask()
    elsewhere.suggest_float("weight[ft1]", 0.0, 1.5)
    elsewhere.suggest_float("weight[ft2]", 0.0, 1.5)
    elsewhere.set_user_attr("worker", "elsewhere:1")
    rdb.record_heartbeat(elsewhere._trial_id)

    study = search(config, evaluator=GateEvaluator(fam["base"], [fam["ft1"], fam["ft2"]], tmp_path), progress=False)
    assert [t.number for t in assert_exact(storage, 3, lost=1)] == [0]
    assert study.trials[0].user_attrs["worker"] == "elsewhere:1"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_with_pruning_a_worker_killed_mid_rungs_is_retried_and_pruned_trials_fill_the_budget_exactly(
        fam, tmp_path, backend):
    if backend == "postgresql" and find_bin() is None and os.environ.get("CI") != "true":
        pytest.skip("PostgreSQL is not installed")
    with (postgres_server() if backend == "postgresql" else _sqlite(tmp_path)) as storage:
        config = tmp_path / "search.yaml"
        data = config_data(fam, tmp_path, storage, n_trials=10)
        config.write_text(yaml.safe_dump({**data, "fidelity": {"rungs": [5, 15, "all"]}}))
        doomed = Worker(config, tmp_path / "gate", hold_at=BASELINES + 1)  # 1st trial (alone: promoted), rung 1
        doomed.wait_held()
        survivor = Worker(config, tmp_path / "gate")
        survivor.wait_until(lambda: any(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                                        and t.user_attrs["worker"].endswith(f":{survivor.pid}")
                                        for t in trials(storage)), "its first trial")
        doomed.kill()
        assert survivor.finish() == 0, survivor.output()
        final = trials(storage)
        ended = [t for t in final if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        [killed] = [t for t in final if t.state == TrialState.FAIL]
        assert len(ended) == 10 and not [t for t in final if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        assert len({tuple(sorted(t.params.items())) for t in ended}) == 10, "a parameter set ran twice"
        assert [t.params for t in ended if t.system_attrs.get("failed_trial") == killed.number] == [killed.params]
        assert killed.intermediate_values  # it died between rungs
        pruned = [t for t in ended if t.state == TrialState.PRUNED]
        assert pruned and all(t.user_attrs["items"] in (5, 15) for t in pruned)
        assert all(t.user_attrs["items"] == 30 for t in ended if t.state == TrialState.COMPLETE)
