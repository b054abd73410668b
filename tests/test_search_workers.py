"""Real `evomerge search` processes on the demo family: resume after kill -9, and two workers on PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from search import demo
from tests.postgres import find_bin, postgres_server

pytestmark = pytest.mark.slow  # trains the demo family, runs searches or worker processes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def family():
    return demo.ensure_zoo()


def write_config(tmp_path: Path, family, n_trials: int) -> Path:
    config = {"name": "workers", "base_model": str(family.base), "models": [str(p) for p in family.finetunes.values()],
              "method": "task_arithmetic", "parameters": {"weight": {"low": 0.0, "high": 1.5}},
              "tasks": [{"name": "zoo_rev"}, {"name": "zoo_cap"}, {"name": "zoo_nxt"}],
              "include_path": str(ROOT / "configs" / "tasks"), "n_trials": n_trials, "threads": 1,
              "batch_size": 1,
              "output_dir": str(tmp_path / "run")}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_worker(config: Path, storage: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "search.cli", "search", str(config), "--storage", storage,
                             "--no-report", "--quiet"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="workers", storage=storage).get_trials()


def wait_for(storage: str, condition, timeout: float = 300) -> None:
    """Poll the study's trial states until ``condition(states)`` holds (the study may not exist yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            states = [t.state for t in trials(storage)]
        except Exception:
            continue
        if condition(states):
            return
    raise AssertionError("the search never reached the awaited state")


def test_search_resumes_after_kill_9_without_losing_or_repeating_a_trial(family, tmp_path):
    config = write_config(tmp_path, family, n_trials=6)
    storage = f"sqlite:///{tmp_path}/study.db"
    worker = start_worker(config, storage)

    def inside_a_trial_after_two(states: list[TrialState]) -> bool:
        if states.count(TrialState.COMPLETE) < 2 or states[-1] != TrialState.RUNNING:
            return False
        os.kill(worker.pid, signal.SIGSTOP)  # freeze it, then make sure it is still inside that trial
        if trials(storage)[-1].state == TrialState.RUNNING:
            return True
        os.kill(worker.pid, signal.SIGCONT)
        return False

    wait_for(storage, inside_a_trial_after_two)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    killed = [t for t in trials(storage) if t.state == TrialState.RUNNING]
    assert len(killed) == 1, "the worker was killed during a trial"

    resumed = start_worker(config, storage)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    final = trials(storage)
    complete = [t for t in final if t.state == TrialState.COMPLETE]
    failed = [t for t in final if t.state == TrialState.FAIL]
    assert len(complete) == 6 and not [t for t in final if t.state == TrialState.RUNNING]
    assert [t.number for t in failed] == [killed[0].number]
    assert "died" in failed[0].user_attrs["fail_reason"]
    retried = [t for t in complete if t.system_attrs.get("failed_trial") == killed[0].number]
    assert len(retried) == 1 and retried[0].params == killed[0].params


@pytest.mark.skipif(find_bin() is None and os.environ.get("CI") != "true", reason="PostgreSQL is not installed")
def test_two_workers_share_one_postgresql_study_exactly(family, tmp_path):
    config = write_config(tmp_path, family, n_trials=8)
    with postgres_server() as storage:
        workers = [start_worker(config, storage) for _ in range(2)]
        for worker in workers:
            _, err = worker.communicate(timeout=600)
            assert worker.returncode == 0, err
        final = trials(storage)
    complete = [t for t in final if t.state == TrialState.COMPLETE]
    assert len(complete) == 8
    assert not [t for t in final if t.state in (TrialState.RUNNING, TrialState.FAIL)]
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 8
    assert len({t.user_attrs["worker"] for t in complete}) == 2, "both workers ran trials"
    assert len([t for t in complete if t.user_attrs.get("handwritten")]) == 1


def test_ctrl_c_finishes_the_current_trial_then_stops_and_prints_the_best(family, tmp_path):
    config = write_config(tmp_path, family, n_trials=50)
    storage = f"sqlite:///{tmp_path}/study.db"
    worker = start_worker(config, storage)
    wait_for(storage, lambda states: states.count(TrialState.COMPLETE) >= 2)
    worker.send_signal(signal.SIGINT)
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    final = trials(storage)
    assert not [t for t in final if t.state == TrialState.RUNNING]
    assert 2 <= len([t for t in final if t.state == TrialState.COMPLETE]) < 50
    assert "best trial" in out and "stopping after the current trial" in out
