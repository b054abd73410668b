"""The demo family on disk: ``build_zoo`` trains it once per spec and code into a directory and returns it
cached afterwards, ``ensure_moe_ready_experts`` does the same for its MoE-ready experts beside it.

This module is the cache plumbing (directories, locks, the manifest's layout) and the summary printer:
what it does never changes a model or a figure, so it is not part of the cache key (see
``search.demo.spec``); the training and the measuring are ``training.train_family``'s.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from merge_core.errors import EvomergeError
from search.demo.items import SKILLS, TASK_SEED
from search.demo.spec import ZooSpec, default_spec
from search.demo.task_files import score_tasks
from search.demo.training import conflicting_name, finetune_seed, train_family, train_moe_ready_experts

DEFAULT_ZOO_DIR = Path("results/zoo")
ZOO_CACHE_ENV = "EVOMERGE_ZOO_DIR"
MANIFEST = "manifest.json"
MOE_READY_DIR = "moe_ready"


@dataclass(frozen=True)
class Zoo:
    """A built family: where each model lives and what the build measured."""

    dir: Path
    base: Path
    finetunes: dict[str, Path]
    manifest: dict = field(repr=False)
    conflicting: dict[str, Path] = field(default_factory=dict)

    @property
    def models(self) -> dict[str, Path]:
        return {"base": self.base, **self.finetunes, **self.conflicting}


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _load_zoo(directory: Path, manifest: dict) -> Zoo:
    """The zoo a manifest describes. Its ``tasks`` are the current task names: they are not in the cache key
    (renaming a task retrains nothing), so an older manifest's may be stale."""
    manifest = {**manifest, "tasks": score_tasks(manifest["spec"]["skills"])}
    path = lambda name: directory / manifest["models"][name]["path"]  # noqa: E731
    return Zoo(dir=directory, base=path("base"), finetunes={skill: path(skill) for skill in manifest["spec"]["skills"]},
               manifest=manifest,
               conflicting={conflicting_name(s): path(conflicting_name(s)) for s in manifest["spec"]["conflicting"]})


def _cached(directory: Path, spec: ZooSpec) -> Zoo | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("digest") != spec.digest():
        return None
    zoo = _load_zoo(directory, manifest)
    return zoo if all((path / "model.safetensors").is_file() for path in zoo.models.values()) else None


def build_zoo(directory: str | Path = DEFAULT_ZOO_DIR, spec: ZooSpec | None = None, *,
              log: Callable[[str], None] = lambda message: None) -> Zoo:
    """Train (or return the cached) base and fine-tunes into ``directory`` and score them (``spec``:
    ``default_spec()`` unless given).

    The cache key is the manifest's digest (``ZooSpec.digest()``: the spec and the training code); a
    directory holding anything but a zoo is refused rather than overwritten.
    """
    spec = spec or default_spec()
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise EvomergeError(f"zoo directory {directory} is a file")
    unknown = [skill for skill in spec.skills if skill not in SKILLS]
    if unknown or len(set(spec.skills)) != len(spec.skills) or len(spec.skills) < 2:
        raise EvomergeError(f"zoo skills must be at least two distinct of {sorted(SKILLS)}, got {list(spec.skills)}")
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = _cached(directory, spec)
        if cached is not None:
            return cached
        foreign = [p.name for p in directory.iterdir()
                   if p.name not in {".lock", MANIFEST, MOE_READY_DIR, "base", *SKILLS, *map(conflicting_name, SKILLS)}]
        if foreign:
            raise EvomergeError(f"{directory} is not a zoo directory (contains {sorted(foreign)[0]}); pick another")
        return _build(directory, spec, log)


def _build(directory: Path, spec: ZooSpec, log: Callable[[str], None]) -> Zoo:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # idle tokenizer threads would spin on our cores
    start, start_cpu = time.perf_counter(), time.process_time()
    (directory / MANIFEST).unlink(missing_ok=True)
    family = train_family(spec, log)
    for name, model in family.models.items():
        shutil.rmtree(directory / name, ignore_errors=True)
        _save(model, family.tokenizer, directory / name)
    figures = family.figures
    manifest = {
        "digest": spec.digest(),
        "spec": asdict(spec),
        "seeds": {"base": spec.seed, **{skill: finetune_seed(spec, skill, False) for skill in spec.skills},
                  **{conflicting_name(s): finetune_seed(spec, s, True) for s in spec.conflicting},
                  "tasks": TASK_SEED},
        "tasks": score_tasks(spec.skills),
        "models": {name: {"path": name, "scores": figures["scores"][name]} for name in family.models},
        "base_check": family.base_check,
        **{key: value for key, value in figures.items() if key != "scores"},
        "build_seconds": round(time.perf_counter() - start, 1),
        "build_cpu_seconds": round(time.process_time() - start_cpu, 1),
    }
    text = json.dumps(manifest, indent=2) + "\n"
    (directory / MANIFEST).write_text(text)
    log(f"zoo built in {manifest['build_seconds']} s: best merge {manifest['best_merge']['average']} "
        f"vs best source {manifest['best_source_average']}")
    return _load_zoo(directory, json.loads(text))  # as a cached call would return it (lists, not tuples)


def ensure_moe_ready_experts(zoo: Zoo, log: Callable[[str], None] = lambda message: None) -> dict[str, dict]:
    """The zoo's skills fine-tuned as MoE experts from its base (built once, cached beside the zoo under the
    same digest): {skill: {"path", "scores"}}. The zoo's own fine-tunes also changed attention, which a
    mixture of experts takes from the base, and they never shared a token with another MLP."""
    directory = zoo.dir / MOE_READY_DIR
    directory.mkdir(exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError):
            manifest = {}
        if manifest.get("digest") != zoo.manifest["digest"]:
            spec = ZooSpec.from_json(zoo.manifest["spec"])
            manifest = {"digest": zoo.manifest["digest"], "experts": {}}
            tokenizer, experts = train_moe_ready_experts(zoo.base, spec, log)
            for skill, (model, scores) in experts.items():
                shutil.rmtree(directory / skill, ignore_errors=True)
                _save(model, tokenizer, directory / skill)
                manifest["experts"][skill] = {"path": skill, "scores": scores}
            (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return {skill: {**entry, "path": directory / entry["path"]} for skill, entry in manifest["experts"].items()}


def project_root() -> Path:
    """The source checkout this package is in, else (an installed evomerge) the current directory: where
    ``results/`` goes."""
    checkout = Path(__file__).resolve().parents[2]
    return checkout if (checkout / "pyproject.toml").is_file() and (checkout / "configs").is_dir() else Path.cwd()


def ensure_zoo(directory: str | Path | None = None, spec: ZooSpec | None = None) -> Zoo:
    """The shared cached zoo (``$EVOMERGE_ZOO_DIR`` or ``results/zoo`` under ``project_root()``): the test
    suite and ``evomerge demo`` build it once between them."""
    return build_zoo(directory or os.environ.get(ZOO_CACHE_ENV) or project_root() / DEFAULT_ZOO_DIR, spec)


def summary(zoo: Zoo) -> str:
    """The score matrix (test split) and the merge proof, as printed by ``evomerge zoo build``."""
    manifest = zoo.manifest
    columns = list(manifest["tasks"])
    lines = [f"zoo in {zoo.dir} (built in {manifest['build_seconds']} s), test-split scores:",
             "model " + "".join(f"{column:>9}" for column in columns)]
    for name, entry in manifest["models"].items():
        lines.append(f"{name:<6}" + "".join(f"{entry['scores']['test'][column]:>9.2f}" for column in columns))
    best = manifest["best_merge"]
    lines.append(f"task arithmetic, every weight {best['weight']}: skill average {best['average']:.2f} "
                 f"vs best source {manifest['best_source_average']:.2f}")
    return "\n".join(lines)
