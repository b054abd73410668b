"""Bad input to `eval`, `report`, `merge`, `zoo` and `demo`, as a hostile user would give it: every case is
one stderr line naming the field or file, exit code 2, no traceback, and the file tree exactly as it was.

Each case builds its input under the test's ``tmp_path`` and returns the command line; the whole of
``tmp_path`` (names, sizes, modification times) is compared before and after the command.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from safetensors.torch import load_file, save_file

from search.cli import main
from search.loop import search
from tests.families import make_family
from tests.test_evaluators import FIXTURE_TASKS
from tests.test_report import ClosenessEvaluator, config_for

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


@pytest.fixture(scope="module", autouse=True)
def no_hub_progress_bars():
    """As in a fresh `evomerge` process, where ``offline_defaults`` turns them off before the hub is imported;
    here other test modules imported it first."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    yield
    if was_enabled:
        logging.enable_progress_bar()


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    paths = {k: v for k, v in make_family(root, "llama", n_finetunes=2).items()}
    paths["two_layers"] = make_family(root / "short", "llama", n_finetunes=0, layers=2)["base"]
    return paths


@pytest.fixture(scope="module")
def run_dir(fam, tmp_path_factory):
    """A finished three-trial search; cases copy its study.db (checkpointed, so the copy is complete)."""
    run = tmp_path_factory.mktemp("run")
    config = config_for({k: str(v) for k, v in fam.items()}, run, n_trials=3)
    search(config, evaluator=ClosenessEvaluator({k: str(v) for k, v in fam.items()}), progress=False)
    with contextlib.closing(sqlite3.connect(run / "study.db")) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return run


@dataclass
class Ctx:
    tmp: Path
    fam: dict[str, Path]
    run: Path
    monkeypatch: pytest.MonkeyPatch
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return path

    def recipe(self, recipe: dict) -> Path:
        return self.file("recipe.yaml", yaml.safe_dump(recipe))

    def copy_model(self, name: str, edit: Callable[[dict], None] | None = None) -> Path:
        """ft1 copied to ``name``, its tensors changed by ``edit``."""
        path = self.tmp / name
        shutil.copytree(self.fam["ft1"], path)
        if edit is not None:
            tensors = load_file(path / "model.safetensors")
            edit(tensors)
            save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return path

    def truncated_model(self) -> Path:
        path = self.copy_model("truncated")
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
        return path

    def run_copy(self) -> Path:
        path = self.tmp / "run"
        path.mkdir()
        shutil.copy2(self.run / "study.db", path / "study.db")
        return path

    def empty_study(self, user_attrs: dict, trials: list[TrialState] = ()) -> Path:
        path = self.tmp / "run"
        path.mkdir()
        storage = optuna.storages.RDBStorage(f"sqlite:///{path}/study.db")
        study = optuna.create_study(study_name="r", storage=storage, direction="maximize")
        for key, value in user_attrs.items():
            study.set_user_attr(key, value)
        for state in trials:
            if state == TrialState.COMPLETE:
                study.tell(study.ask(), 1.0)
            else:
                study.tell(study.ask(), state=state)
        storage.engine.dispose()  # SQLite folds its write-ahead log back into study.db
        return path

    def read_only(self, path: Path) -> Path:
        """``path`` (created) made unwritable: by its mode, or, for root, whom modes do not stop, immutable."""
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o555)
        self.stack.callback(path.chmod, 0o755)
        if _writable(path):
            if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
                self.stack.callback(subprocess.run, ["chattr", "-i", str(path)], capture_output=True)
            if _writable(path):
                pytest.skip("cannot make a directory read-only here (root without chattr)")
        return path

    def fail_writes(self, predicate: Callable[[Path], bool]) -> None:
        """A full disk from the moment ``predicate`` first accepts a file the merge writes with write_text."""
        real = Path.write_text

        def write_text(path, *args, **kwargs):
            if predicate(path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real(path, *args, **kwargs)

        self.monkeypatch.setattr(Path, "write_text", write_text)

    def fail_fallocate_after(self, reservations: int) -> None:
        """A disk that fills after ``reservations`` shards have taken their space."""
        real = os.posix_fallocate
        calls = []

        def fallocate(fd, offset, length):
            calls.append(length)
            if len(calls) > reservations:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, offset, length)

        self.monkeypatch.setattr(os, "posix_fallocate", fallocate)


def _writable(path: Path) -> bool:
    probe = path / ".probe"
    try:
        probe.write_text("")
    except OSError:
        return False
    probe.unlink()
    return True


def linear(c: Ctx, w1: float = 0.5, w2: float = 0.5, **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(c.fam["ft1"]), "parameters": {"weight": w1}},
                                                 {"model": str(c.fam["ft2"]), "parameters": {"weight": w2}}], **extra}


def set_first_value(value: float) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = value
    return edit


def eval_args(c: Ctx, *extra, model: Path | None = None) -> list:
    return ["eval", model or c.fam["ft1"], "--tasks", "fx_pick", "--include-path", FIXTURE_TASKS, "--limit", "2",
            "--batch-size", "4", *extra]


def cuda_case(c: Ctx) -> list:
    return eval_args(c, "--device", f"cuda:{torch.cuda.device_count() + 1}" if torch.cuda.is_available() else "cuda")


# (id, command line built in the case's tmp_path, substring of the one error line)
CASES: list[tuple[str, Callable[[Ctx], list], str]] = [
    # --- eval -------------------------------------------------------------------------------------------
    ("eval: model dir missing", lambda c: eval_args(c, model=c.tmp / "nowhere"), "nowhere does not exist"),
    ("eval: truncated safetensors", lambda c: eval_args(c, model=c.truncated_model()),
     "model.safetensors is truncated"),
    ("eval: config.json not JSON", lambda c: eval_args(c, model=_bad_config(c)), "config.json is not valid JSON"),
    ("eval: --limit 0", lambda c: eval_args(c, "--limit", "0"), "limit must be a whole number"),
    ("eval: --limit -3", lambda c: eval_args(c, "--limit", "-3"), "got -3"),
    ("eval: --limit nan", lambda c: eval_args(c, "--limit", "nan"), "got nan"),
    ("eval: --limit 2.5", lambda c: eval_args(c, "--limit", "2.5"), "got 2.5"),
    ("eval: --limit abc", lambda c: eval_args(c, "--limit", "abc"), "argument --limit: invalid float value: 'abc'"),
    ("eval: --num-fewshot -1", lambda c: eval_args(c, "--num-fewshot", "-1"), "num_fewshot must be >= 0, got -1"),
    ("eval: more few-shot examples than the task has", lambda c: eval_args(c, "--num-fewshot", "100000"),
     "task 'fx_pick' (search split, 100000 few-shot): cannot build its requests"),
    ("eval: --batch-size 0", lambda c: eval_args(c, "--batch-size", "0"), "batch_size must be >= 1, got 0"),
    ("eval: --threads 0", lambda c: eval_args(c, "--threads", "0"), "threads must be >= 1, got 0"),
    ("eval: --device tpu", lambda c: eval_args(c, "--device", "tpu"), "--device 'tpu': use cpu or cuda"),
    ("eval: --device cuda:x", lambda c: eval_args(c, "--device", "cuda:x"), "--device 'cuda:x': not a device name"),
    ("eval: --device cuda, none here", cuda_case, "--device cuda"),
    ("eval: --split that the task lacks", lambda c: eval_args(c, "--split", "bogus"), "has no 'bogus' split"),
    ("eval: --include-path a file", lambda c: ["eval", c.fam["ft1"], "--tasks", "fx_pick", "--include-path",
                                               c.file("tasks.yaml", "x")], "tasks.yaml is not a directory"),
    ("eval: --apply-chat-template without a template", lambda c: eval_args(c, "--apply-chat-template"),
     "apply_chat_template: the model's tokenizer has no chat template"),
    ("eval: --perplexity file missing", lambda c: ["eval", c.fam["ft1"], "--perplexity", c.tmp / "none.txt"],
     "none.txt not found"),
    ("eval: --perplexity binary file", lambda c: ["eval", c.fam["ft1"], "--perplexity",
                                                  c.file("bin.txt", b"\xff\xfe\x00\x81" * 8)], "is not UTF-8 text"),
    ("eval: nothing to score", lambda c: ["eval", c.fam["ft1"]], "nothing to score"),
    ("eval: --output a directory", lambda c: eval_args(c, "--output", c.tmp), "is a directory; give a file name"),
    ("eval: --output under a file", lambda c: eval_args(c, "--output", c.file("f", "x") / "s.json"),
     "f is not a directory"),
    ("eval: --output in a read-only dir", lambda c: eval_args(c, "--output", c.read_only(c.tmp / "ro") / "s.json"),
     "cannot write in"),
    # --- report -----------------------------------------------------------------------------------------
    ("report: --storage not a URL", lambda c: ["report", c.run_copy(), "--storage", "not a url"],
     "storage 'not a url': not a database URL"),
    ("report: in-memory SQLite storage", lambda c: ["report", c.tmp, "--storage", "sqlite://"],
     "storage sqlite://: OperationalError"),
    ("report: no study here", lambda c: ["report", c.tmp], "no study here"),
    ("report: study.db not SQLite", lambda c: ["report", c.file("run/study.db", "x" * 500).parent],
     "study.db is not an SQLite database"),
    ("report: study.db empty", lambda c: ["report", c.file("run/study.db", "").parent], "study.db is empty"),
    ("report: study not made by evomerge", lambda c: ["report", c.empty_study({}, [TrialState.COMPLETE])],
     "was not made by evomerge search"),
    ("report: stored config invalid", lambda c: ["report", c.empty_study({"config": {"name": 3}})],
     "study 'r': stored config: "),
    ("report: no complete trial", lambda c: ["report", c.empty_study(
        {"config": config_for({k: str(v) for k, v in c.fam.items()}, c.tmp).model_dump(mode="json")},
        [TrialState.FAIL])], "has no completed trial yet (0 running, 1 failed)"),
    ("report: --study-name unknown", lambda c: ["report", c.run_copy(), "--study-name", "zz", "--no-test"],
     "has no study 'zz' (it has: r)"),
    ("report: --top-k 0", lambda c: ["report", c.run_copy(), "--top-k", "0"], "--top-k must be at least 1, got 0"),
    ("report: --top-k x", lambda c: ["report", c.run_copy(), "--top-k", "x"], "argument --top-k: invalid int value"),
    ("report: corrupt test-score cache", lambda c: ["report", _with_file(c.run_copy(), "test_scores.json", "{bad")],
     "test_scores.json: not valid JSON"),
    ("report: read-only run dir", lambda c: ["report", c.read_only(c.run_copy()), "--no-test"],
     "run directory"),
    # --- merge ------------------------------------------------------------------------------------------
    ("merge: recipe not text", lambda c: ["merge", c.file("r.yaml", b"\xff\xfe\x00\x81"), c.tmp / "out"],
     "r.yaml: not a text file"),
    ("merge: recipe a directory", lambda c: ["merge", c.tmp, c.tmp / "out"], "recipe file not found"),
    ("merge: output under a file", lambda c: ["merge", c.recipe(linear(c)), c.file("f", "x") / "out"],
     "f is not a directory"),
    ("merge: output in a read-only dir", lambda c: ["merge", c.recipe(linear(c)), c.read_only(c.tmp / "ro") / "out"],
     "cannot create it"),
    ("merge: output parents made for a merge that fails are removed",
     lambda c: ["merge", c.recipe({"merge_method": "linear", "models": [
         {"model": str(c.fam["ft1"]), "parameters": {"weight": 1}},
         {"model": str(c.fam["two_layers"]), "parameters": {"weight": 1}}]}), c.tmp / "new" / "deep" / "out"],
     "different numbers of layers"),
    ("merge: nuslerp of 3 models", lambda c: ["merge", c.recipe({"merge_method": "nuslerp", "models": [
        {"model": str(c.fam[m]), "parameters": {"weight": 1}} for m in ("base", "ft1", "ft2")]}), c.tmp / "out"],
     "nuslerp"),
    ("merge: linear weights summing to 0", lambda c: ["merge", c.recipe(linear(c, 0, 0)), c.tmp / "out"],
     "linear's weights (0, 0) sum to 0 in float32, and normalize: true divides by that sum"),
    ("merge: linear weights whose sum overflows", lambda c: ["merge", c.recipe(linear(c, 3e38, 3e38)), c.tmp / "out"],
     "linear's weights (3e+38, 3e+38) sum to inf in float32"),
    ("merge: linear weight beyond float32", lambda c: ["merge", c.recipe(linear(c, 1e39, 1, parameters={
        "normalize": False})), c.tmp / "out"], "linear's weight 1e+39 is beyond the range of float32"),
    ("merge: merged values overflow float32", lambda c: ["merge", c.recipe({"merge_method": "linear", "parameters": {
        "normalize": False}, "models": [{"model": str(c.copy_model("huge", set_first_value(3e38))),
                                         "parameters": {"weight": 2}},
                                        {"model": str(c.fam["ft2"]), "parameters": {"weight": 1}}]}), c.tmp / "out"],
     "model.layers.1.mlp.up_proj.weight: linear produced Inf from finite inputs: the merged values overflow float32 "
     "(largest finite 3.403e+38) (weights: 2, 1)"),
    ("merge: values overflow the output dtype", lambda c: ["merge", c.recipe(linear(
        c, 1e6, 1e6, parameters={"normalize": False}, dtype="float32", out_dtype="float16")), c.tmp / "out"],
     "the merged values overflow the output dtype float16 (largest finite 6.55e+04)"),
    ("merge: a source holding NaN", lambda c: ["merge", c.recipe({"merge_method": "linear", "models": [
        {"model": str(c.copy_model("nan", set_first_value(float("nan")))), "parameters": {"weight": 1}},
        {"model": str(c.fam["ft2"]), "parameters": {"weight": 1}}]}), c.tmp / "out"],
     "model.layers.1.mlp.up_proj.weight: model"),
    ("merge: truncated source", lambda c: ["merge", c.recipe({"merge_method": "linear", "models": [
        {"model": str(c.truncated_model()), "parameters": {"weight": 1}}]}), c.tmp / "out"], "is truncated"),
    ("merge: --device tpu", lambda c: ["merge", c.recipe(linear(c)), c.tmp / "out", "--device", "tpu"],
     "use cpu or cuda"),
    ("merge: --seed abc", lambda c: ["merge", c.recipe(linear(c)), c.tmp / "out", "--seed", "abc"],
     "argument --seed: invalid int value"),
    ("merge: --out-shard-size -1", lambda c: ["merge", c.recipe(linear(c)), c.tmp / "out", "--out-shard-size", "-1"],
     "bad shard size '-1'"),
    ("merge: disk full after the first shard", lambda c: (c.fail_fallocate_after(1), [
        "merge", c.recipe(linear(c)), c.tmp / "out", "--out-shard-size", "100KB"])[1],
     "out/model-00002-of-00002.safetensors: no room for"),
    ("merge: disk full after the weights", lambda c: (c.fail_writes(lambda p: p.name == "config.json"), [
        "merge", c.recipe(linear(c)), c.tmp / "out"])[1], "out: cannot write config.json (No space left on device)"),
    # --- zoo and demo -----------------------------------------------------------------------------------
    ("zoo build: dir under a file", lambda c: ["zoo", "build", c.file("f", "x") / "zoo", "--quiet"],
     "f is not a directory"),
    ("zoo build: read-only dir", lambda c: ["zoo", "build", c.read_only(c.tmp / "ro") / "zoo", "--quiet"],
     "cannot write in"),
    ("zoo build: a dir holding other files", lambda c: ["zoo", "build", c.file("mine/notes.txt", "x").parent,
                                                        "--quiet"], "is not a zoo directory (contains notes.txt)"),
    ("zoo tasks: read-only dir", lambda c: ["zoo", "tasks", c.read_only(c.tmp / "ro")], "cannot write in"),
    ("zoo: no action", lambda c: ["zoo"], "the following arguments are required: {build,tasks}"),
    ("demo: --config missing", lambda c: ["demo", "--config", c.tmp / "none.yaml"], "none.yaml"),
    ("demo: --config garbage", lambda c: ["demo", "--config", c.file("configs/demo.yaml", "a: [b\n")],
     "not valid YAML"),
    ("demo: --storage not a URL", lambda c: ["demo", "--config", _demo_config(c), "--storage", "not a url"],
     "storage 'not a url': not a database URL"),
    ("demo: results/zoo holding other files", lambda c: (c.file("results/zoo/notes.txt", "x"), [
        "demo", "--config", _demo_config(c)])[1], "is not a zoo directory (contains notes.txt)"),
]


def _bad_config(c: Ctx) -> Path:
    path = c.copy_model("bad_config")
    (path / "config.json").write_text("{not json")
    return path


def _with_file(directory: Path, name: str, content: str) -> Path:
    (directory / name).write_text(content)
    return directory


def _demo_config(c: Ctx) -> Path:
    return c.file("configs/demo.yaml", DEMO_CONFIG.read_text())


def tree(root: Path) -> dict[str, tuple]:
    """Every path under ``root``; files with their size and modification time (a directory's time changes
    with any probe file or SQLite's transient -shm file, so only its existence counts)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("build,expected", [pytest.param(b, e, id=i) for i, b, e in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_no_file(build, expected, fam, run_dir, tmp_path, monkeypatch,
                                                          capsys):
    ctx = Ctx(tmp_path, fam, run_dir, monkeypatch)
    with ctx.stack:
        argv = [str(a) for a in build(ctx)]
        before = tree(tmp_path)
        capsys.readouterr()
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
        err = capsys.readouterr().err
        after = tree(tmp_path)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"evomerge {argv[0]}: error: "), lines[0]
    assert expected in lines[0], lines[0]
    assert after == before
