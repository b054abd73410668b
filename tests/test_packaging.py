"""A non-editable install carries what the commands read at run time: the task YAMLs and their data, the demo
config and the examples, the C kernel's source; run from elsewhere, it finds them in its own copy."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project built as a wheel (offline: this venv's setuptools) and installed into its own directory."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"  # a clean copy: the build leaves nothing in the checkout, and no stale build/ in it
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "results", "build", "dist",
                                                               "*.egg-info", "__pycache__", ".pytest_cache"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp / "dist").glob("evomerge-*.whl"))
    target = tmp / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    return wheel, target


def test_the_wheel_holds_every_shipped_config_task_and_data_file(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*")
               if p.is_file() and p.suffix in (".yaml", ".jsonl", ".txt")]
    assert len(shipped) >= 20
    assert not [name for name in shipped if f"evomerge_configs/{name}" not in names]
    assert "merge_core/native.c" in names


def test_an_installed_copy_run_elsewhere_reads_its_own_configs_and_builds_the_demo_tasks(installed, tmp_path):
    _, target = installed
    probe = ("import json\n"
             "from evaluators.tasks import CONFIGS_DIR, DEFAULT_INCLUDE_PATH, build_tasks\n"
             "from search.demo import project_root\n"
             "from search.cli import build_parser\n"
             "demo = build_parser().parse_args(['demo']).config\n"
             "tasks = build_tasks(['zoo_rev', 'zoo_cap'], DEFAULT_INCLUDE_PATH, 'test')\n"
             "print(json.dumps({'configs': str(CONFIGS_DIR), 'demo': demo, 'root': str(project_root()),\n"
             "                  'docs': {name: len(list(task.eval_docs)) for name, task in tasks.items()}}))\n")
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(found["configs"]).resolve() == (target / "evomerge_configs").resolve()
    assert Path(found["demo"]).resolve() == (target / "evomerge_configs" / "demo.yaml").resolve()
    assert Path(found["root"]).resolve() == tmp_path.resolve()  # results/ goes under the current directory
    assert found["docs"] == {"zoo_rev": 100, "zoo_cap": 100}
