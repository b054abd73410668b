"""Find and build lm-eval tasks once: project task YAMLs first, lm-eval's standard tasks only when asked for.

lm-eval resolves ``dataset_kwargs.data_files`` relative to the current directory; evomerge's task YAMLs
name them relative to the YAML file, so task configs are loaded here as dicts with those paths made absolute
and the scored split (``search``/``test``) set as ``test_split`` before lm-eval builds the task.
"""

from __future__ import annotations

import difflib
import functools
import glob
import logging
import re
from pathlib import Path
from typing import Any

from evaluators._lm_eval_compat import is_tag, is_yaml_task
from merge_core.errors import EvomergeError


def _configs_dir() -> Path:
    """``configs/`` of a source checkout, else its copy installed as the ``evomerge_configs`` package data."""
    import importlib.util

    checkout = Path(__file__).resolve().parent.parent / "configs"
    if (checkout / "demo.yaml").is_file():
        return checkout
    spec = importlib.util.find_spec("evomerge_configs")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else checkout


CONFIGS_DIR = _configs_dir()
DEFAULT_INCLUDE_PATH = CONFIGS_DIR / "tasks"
LM_EVAL_LOGGERS = ("lm_eval", "lm-eval", "datasets", "fsspec", "filelock")


def quiet_lm_eval() -> None:
    """lm-eval logs several lines per task and per call; the search scores hundreds of candidates."""
    for name in LM_EVAL_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()


NAME_LINE = re.compile(r"^(?:task|group|tag):[ \t]*[\"']?([\w.\-]+)", re.M)
TAG_LIST = re.compile(r"^tag:[ \t]*\n((?:[ \t]*-[ \t]*\S+[ \t]*\n)+)", re.M)
TAG_INLINE = re.compile(r"^tag:[ \t]*\[([^\]]*)\]", re.M)


@functools.lru_cache(maxsize=1)
def standard_task_dirs() -> dict[str, frozenset[Path]]:
    """Where each of lm-eval's standard task/group/tag names is defined, from a text scan of its YAMLs.

    A full ``TaskManager`` index parses ~14k YAMLs (10-30 s); this scan takes a fraction of a second, so
    only the directories of the standard tasks actually asked for get indexed.
    """
    import lm_eval

    dirs: dict[str, set[Path]] = {}
    for yaml_file in (Path(lm_eval.__file__).parent / "tasks").rglob("*.yaml"):
        text = yaml_file.read_text(encoding="utf-8", errors="ignore")
        names = NAME_LINE.findall(text)
        names += [line.strip(" -\t\"'") for block in TAG_LIST.findall(text) for line in block.splitlines()]
        names += [tag.strip(" \"'") for block in TAG_INLINE.findall(text) for tag in block.split(",")]
        for name in names:
            dirs.setdefault(name, set()).add(yaml_file.parent)
    return {name: frozenset(found) for name, found in dirs.items()}


@functools.lru_cache(maxsize=16)
def task_manager(paths: tuple[str, ...], include_defaults: bool = False):
    """An lm-eval task index over ``paths``, built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None, include_defaults=include_defaults)


def _manager_knowing(names: list[str], include_path: str | None):
    """A task index with the project's tasks plus the directories of any standard lm-eval task asked for."""
    local = task_manager((include_path,)) if include_path else None
    missing = [name for name in names if local is None or name not in local.all_tasks]
    if not missing:
        return local
    standard = standard_task_dirs()
    unknown = [name for name in missing if name not in standard]
    if unknown:
        known = sorted(set(standard) | set(local.all_tasks if local else ()))
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean: {', '.join(close)}?)" if close else ""))
        where = f"{include_path} or lm-eval's standard tasks" if include_path else "lm-eval's standard tasks"
        raise EvomergeError(f"unknown task {'; '.join(hints)}: not in {where}")
    dirs = sorted({str(d) for name in missing for d in standard[name]})
    return task_manager(tuple(([include_path] if include_path else []) + dirs))


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _absolute(path: str, base: Path, task: str) -> str:
    if "://" in path:
        return path
    resolved = Path(path).expanduser()
    resolved = resolved if resolved.is_absolute() else base / resolved
    found = glob.glob(str(resolved)) if _has_glob(path) else ([str(resolved)] if resolved.exists() else [])
    if not found:
        raise EvomergeError(f"task {task!r}: data file {path!r} not found (looked at {resolved})")
    return str(resolved)


def _absolute_data_files(data_files: Any, base: Path, task: str) -> Any:
    if isinstance(data_files, str):
        return _absolute(data_files, base, task)
    if isinstance(data_files, list):
        return [_absolute_data_files(f, base, task) for f in data_files]
    if isinstance(data_files, dict):
        return {split: _absolute_data_files(f, base, task) for split, f in data_files.items()}
    return data_files


def task_config(yaml_path: Path, split: str | None) -> dict[str, Any]:
    """The task's YAML as a dict, local data paths made absolute and ``split`` made the scored split."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(yaml_path, resolve_func=True)
    name = config["task"]
    for key in ("tag", "group", "task_list"):
        config.pop(key, None)
    kwargs = dict(config.get("dataset_kwargs") or {})
    if "data_files" in kwargs:
        kwargs["data_files"] = _absolute_data_files(kwargs["data_files"], yaml_path.parent, name)
        splits = kwargs["data_files"].keys() if isinstance(kwargs["data_files"], dict) else None
        if split is not None and splits is not None and split not in splits:
            raise EvomergeError(f"task {name!r} has no {split!r} split in {yaml_path} (it has: {', '.join(splits)})")
    if "data_dir" in kwargs:
        kwargs["data_dir"] = _absolute(kwargs["data_dir"], yaml_path.parent, name)
    config["dataset_kwargs"] = kwargs
    if split is not None:
        config["test_split"] = split
    return config


def build_tasks(names: list[str], include_path: str | Path | None, split: str | None) -> dict[str, Any]:
    """lm-eval ``Task`` objects by name, each loaded with its data once.

    Tags expand to their YAML tasks, which get the path handling above; groups and Python tasks are loaded
    by lm-eval as they are (their data paths are not rewritten).
    """
    include = str(Path(include_path).resolve()) if include_path else None
    manager = _manager_knowing(names, include)
    specs: list[str | dict[str, Any]] = []
    for name in names:
        entry = manager.task_index[name]
        members = sorted(entry.tags) if is_tag(entry) else [name]
        for member in members:
            found = manager.task_index.get(member)
            if found is not None and is_yaml_task(found):
                specs.append(task_config(Path(found.yaml_path), split))
            else:
                specs.append(member)
    try:
        tasks = _load(manager, specs, include)
    except EvomergeError:
        raise
    except ConnectionError as exc:
        raise EvomergeError(f"data of task(s) {', '.join(names)} not available offline (HF_DATASETS_OFFLINE=0 "
                            f"downloads it): {exc}") from exc
    except (OSError, ValueError, KeyError) as exc:
        raise EvomergeError(f"cannot load tasks {', '.join(names)}: {type(exc).__name__}: {exc}") from exc
    if split is not None:
        for name, task in tasks.items():
            _select_split(name, task, split)
    return tasks


def _load(manager: Any, specs: list, include: str | None) -> dict[str, Any]:
    """Standard groups may reference tasks outside their own directory: then index all of lm-eval's tasks."""
    try:
        return manager.load(specs)["tasks"]
    except KeyError:
        if all(isinstance(spec, dict) for spec in specs):
            raise
        return task_manager((include,) if include else (), True).load(specs)["tasks"]


def _select_split(name: str, task: Any, split: str) -> None:
    """Groups and Python tasks don't pass through ``task_config``; point them at ``split`` afterwards."""
    if task.get_config("test_split") == split:
        return
    available = list(getattr(task, "dataset", {}) or {})
    if split not in available:
        raise EvomergeError(f"task {name!r} has no {split!r} split (it has: {', '.join(available)}); "
                            f"score its own split with split=None (CLI: --split default)")
    task.set_config("test_split", split)
    task.task_docs = task.eval_docs
