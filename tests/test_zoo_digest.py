"""The demo family's cache key without training anything: ``ZooSpec.digest()`` changes with a spec field and
with the training code, never with the task files' writer, the cache plumbing or the summary printer, whose
edits must not cost a rebuild (150-350 CPU-seconds). Edits are made to a copy of the package, whose
``spec`` module digests the sources beside it."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest

import search.demo.spec as spec_module
from search.demo import DEFAULT_SPEC, TRAINING_CODE

PACKAGE = Path(spec_module.__file__).resolve().parent
LEFT_OUT = ("__init__.py", "spec.py", "task_files.py", "zoo.py")


def digest_of_copy(directory: Path, edited: str | None = None) -> str:
    """``DEFAULT_SPEC.digest()`` as computed by a copy of the package in ``directory``, with ``edited`` (a
    module's file name) changed by one appended line."""
    copy = directory / "demo"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    if edited is not None:
        path = copy / edited
        path.write_text(path.read_text() + "\nEDITED = True  # an edit that changes no behaviour\n")
    name = f"_zoo_digest_copy_{directory.name}"
    loader_spec = importlib.util.spec_from_file_location(name, copy / "spec.py")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    try:
        loader_spec.loader.exec_module(module)
        return module.DEFAULT_SPEC.digest()
    finally:
        del sys.modules[name]


def test_every_module_of_the_package_is_either_in_the_digest_or_left_out_on_purpose():
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == sorted(set(TRAINING_CODE) | set(LEFT_OUT))
    assert not set(TRAINING_CODE) & set(LEFT_OUT)


def test_an_unedited_copy_has_the_same_digest(tmp_path):
    assert digest_of_copy(tmp_path) == DEFAULT_SPEC.digest()


@pytest.mark.parametrize("module", ["task_files.py", "zoo.py", "__init__.py"])
def test_editing_the_task_files_the_cache_or_the_summary_keeps_the_digest(tmp_path, module):
    assert digest_of_copy(tmp_path, module) == DEFAULT_SPEC.digest()


@pytest.mark.parametrize("module", TRAINING_CODE)
def test_editing_the_training_code_changes_the_digest(tmp_path, module):
    assert digest_of_copy(tmp_path, module) != DEFAULT_SPEC.digest()


def test_every_spec_field_changes_the_digest():
    changed = {"skills": ("rev", "cap"), "conflicting": ("cap",), "merge_weights": (1.0,)}
    for field in fields(DEFAULT_SPEC):
        value = getattr(DEFAULT_SPEC, field.name)
        other = changed.get(field.name, value + 1 if isinstance(value, int) else value * 2)
        assert replace(DEFAULT_SPEC, **{field.name: other}).digest() != DEFAULT_SPEC.digest(), field.name
