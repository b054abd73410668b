"""A search over a family larger than this machine's memory: peak memory and seconds per candidate.

Writes (once, under ``--workdir``) a random bf16 family with the tensor shapes of Llama-3.2-3B, a base and
three fine-tunes (``merge_vs_mergekit.py``'s writer: base + a random delta of 10% of the weights' spread),
about 26 GB of weights, and gives the base the demo family's character tokenizer. Then it runs
``evomerge search`` in a child process on it (bf16, task arithmetic with a weight per fine-tune, 5 trials,
scored by the perplexity of 128 tokens of held-out text) and samples the child's memory every 0.2 s:
resident anonymous memory (what the live model, copies and caches take) and resident file pages (the
memory-mapped sources, which the kernel reads on demand and drops under pressure). Prints the family's
size, the memory available at the start, the peaks, and each trial's materialize and eval seconds.

    python benchmarks/larger_than_ram.py [--workdir /tmp/evomerge-bench] [--trials 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from merge_vs_mergekit import model_family  # noqa: E402

from merge_core.memory import GIB, available_memory  # noqa: E402

SHAPE = "llama-3b"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def family_bytes(paths: list[Path]) -> int:
    return sum(f.stat().st_size for p in paths for f in p.glob("*.safetensors"))


def sample(pid: int, peaks: dict, stop: threading.Event) -> None:
    """Peak RssAnon / RssFile of the child and its memory available low point, from /proc."""
    while not stop.is_set():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            key = line.split(":")[0]
            if key in ("RssAnon", "RssFile", "VmHWM"):
                peaks[key] = max(peaks.get(key, 0), int(line.split()[1]) * 1024)
        peaks["min available"] = min(peaks.get("min available", 1 << 62), available_memory())
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/evomerge-bench")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    paths = model_family(workdir, SHAPE)
    from search.demo import ensure_zoo

    zoo = ensure_zoo()
    for name in TOKENIZER_FILES:
        if (zoo.base / name).is_file():
            shutil.copy(zoo.base / name, paths[0] / name)
    run = workdir / "larger_than_ram_run"
    shutil.rmtree(run, ignore_errors=True)
    config = {"name": "larger_than_ram", "base_model": str(paths[0]), "models": [str(p) for p in paths[1:]],
              "method": "task_arithmetic", "dtype": "bfloat16", "parameters": {"weight": {"low": 0.0, "high": 1.0}},
              "tasks": [{"name": "held"}],
              "perplexity": [{"name": "held", "text": str(REPO / "configs" / "tasks" / "data" / "heldout.txt"),
                              "max_tokens": 128, "context_length": 64}],
              "sampler": "random", "n_trials": args.trials, "output_dir": str(run)}
    run.mkdir(parents=True)
    (run / "search.yaml").write_text(json.dumps(config))
    size = family_bytes(paths)
    available = available_memory()
    print(f"family: {len(paths)} models, {size / GIB:.1f} GiB of bf16 weights; memory available: "
          f"{available / GIB:.1f} GiB", flush=True)
    started = time.perf_counter()
    child = subprocess.Popen([str(Path(sys.executable).parent / "evomerge"), "search", str(run / "search.yaml"),
                              "--quiet", "--no-report"])
    peaks: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=sample, args=(child.pid, peaks, stop), daemon=True)
    watcher.start()
    code = child.wait()
    stop.set()
    wall = time.perf_counter() - started
    gib = {key: value / GIB for key, value in peaks.items()}
    print(f"exit {code}, {wall:.0f} s in all; peak anonymous {gib.get('RssAnon', 0):.1f} GiB, peak file-backed "
          f"resident {gib.get('RssFile', 0):.1f} GiB, peak RSS {gib.get('VmHWM', 0):.1f} GiB; lowest memory "
          f"available {gib.get('min available', 0):.1f} GiB", flush=True)
    import optuna

    study = optuna.load_study(study_name="larger_than_ram", storage=f"sqlite:///{run / 'study.db'}")
    for t in study.trials:
        print(f"trial {t.number}: {t.state.name}, materialize {t.user_attrs.get('materialize_seconds', 0):.1f} s, "
              f"eval {t.user_attrs.get('eval_seconds', 0):.1f} s, perplexity "
              f"{t.user_attrs.get('scores', {}).get('tasks', {}).get('held', {}).get('metrics', {}).get('perplexity')}")


if __name__ == "__main__":
    main()
