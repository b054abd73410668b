"""Layer-path search: recovery of a known path, PS + DFS against PS alone, and trial speed.

1. Recovery: a trained model (the ``cap`` fine-tune of a family) extended with one perturbed copy after each
   layer (noise of 1 standard deviation per tensor), so the original layers are the known best path among
   2^(2L) subsets; a layer-path search over the extended model alone, scored on the perplexity of the skill's
   correct answers (lower is better), should find the original path. Printed per sampler and seed: the first
   trial whose path is the original one, the first that reaches the original model's score, and the best.
2. PS + DFS: the family's parameter search (TIES weights and densities), then layer paths through its best
   merge and the three skill fine-tunes, with scales; the stage's leaderboard gives PS alone (the merge's row)
   and PS + DFS (the best row) on the search and test splits, with paired-bootstrap CIs.
3. Speed: seconds per trial (materialize + evaluate) of the parameter search and of the layer-path stage.

    python benchmarks/routing.py [--family demo|deep] [--samplers tpe,cmaes,random] [--seeds 3] [--trials 200]
                                 [--ps-trials 10] [--dfs-trials 100] [--dfs-sampler S] [--skip recovery|psdfs]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from optuna.trial import TrialState  # noqa: E402

from merge_core.routing import path_of_recipe  # noqa: E402
from search.config import SearchConfig  # noqa: E402
from search.loop import rank_value, search  # noqa: E402
from search.preflight import build_evaluator  # noqa: E402
from tests.families import extend_with_perturbed_layers  # noqa: E402

TASKS = [{"name": n, "metric": "exact_match"} for n in ("zoo_rev", "zoo_cap", "zoo_nxt")]
# Exact match on the skill is reached by many paths (a few perturbed layers change no answer); the perplexity of
# the skill's own correct answers moves with every layer, so the original path is the one best point.
RECOVERY_TASKS = [{"name": "cap_answers", "metric": "perplexity"}]
CAP_ANSWERS = """task: cap_answers
dataset_path: json
dataset_kwargs:
  data_files:
    search: {search}
    test: {test}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: 1.0
"""


def family(name: str) -> dict:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from multi_objective import family_paths

    return family_paths(name)


def recovery(fam: dict, samplers: list[str], seeds: int, trials: int, out: Path) -> None:
    source = Path(next(m for m in fam["models"] if m.endswith("cap")))
    extended = out / "cap_extended"
    originals = extend_with_perturbed_layers(source, extended, copies=1, noise=1.0) if not extended.exists() else None
    if originals is None:
        originals = list(range(0, json.loads((extended / "config.json").read_text())["num_hidden_layers"], 2))
    # scored on the skill the model was tuned for, where its own layers are the known best path
    data = REPO / "configs" / "tasks" / "data"
    tasks = out / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "cap_answers.yaml").write_text(CAP_ANSWERS.format(search=data / "cap_search.jsonl",
                                                               test=data / "cap_test.jsonl"))
    base = {"name": "recovery", "base_model": fam["base_model"], "models": [str(source), str(extended)],
            "include_path": str(tasks),
            "tasks": RECOVERY_TASKS,
            "routing": {"sources": [str(extended)], "min_layers": 2},
            "n_trials": trials}
    evaluator = None
    print(f"\n1. recovery: {len(originals) * 2} slots, the original path {originals}; {trials} trials")
    print("| sampler | seed | first trial on the original path | first at the original's score | best | original "
          "model | extended as it is | s/trial |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for sampler in samplers:
        for seed in range(seeds):
            config = SearchConfig.model_validate({**base, "sampler": sampler, "seed": seed,
                                                  "output_dir": str(out / f"recovery_{sampler}_{seed}")})
            evaluator = evaluator or build_evaluator(config)
            started = time.time()
            study = search(config, evaluator=evaluator, progress=False)
            seconds = (time.time() - started) / trials
            done = [t for t in study.trials if t.state == TrialState.COMPLETE and "source" not in t.user_attrs]
            hit = next((t.number for t in done if [s.layer for s in path_of_recipe(t.user_attrs["recipe"])]
                        == originals), None)
            target = study.user_attrs["baselines"]["cap"]["objective"]
            reach = next((t.number for t in done if rank_value(t) >= target - 1e-9), None)
            best = max(rank_value(t) for t in done)
            print(f"| {sampler} | {seed} | {hit if hit is not None else 'not found'} | "
                  f"{reach if reach is not None else 'not reached'} | {best:.4f} | {target:.4f} | "
                  f"{study.user_attrs['baselines']['cap_extended']['objective']:.4f} | {seconds:.3f} |", flush=True)


def ps_dfs(fam: dict, trials: int, dfs_trials: int, seeds: int, out: Path, sampler: str | None = None) -> Path:
    import pandas as pd
    import yaml

    from search.cli import main

    skills = [m for m in fam["models"] if not m.endswith("rev2")]
    print(f"\n2. PS + DFS: {trials} parameter-search trials, then {dfs_trials} layer-path trials through the best "
          f"merge and the skill fine-tunes (scales in [0.5, 1.5]; sampler {sampler or 'default'}); Δ: PS + DFS minus "
          "PS alone, paired bootstrap 95%")
    print("| seed | PS (search) | PS + DFS (search) | Δ search [CI] | PS (test) | PS + DFS (test) | Δ test [CI] | "
          "layers | s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for seed in range(seeds):
        run = out / f"psdfs_{seed}"
        config = {"name": "psdfs", "base_model": fam["base_model"], "models": fam["models"], "method": "ties",
                  "parameters": {"weight": {"low": 0.0, "high": 1.5}, "density": {"low": 0.2, "high": 1.0}},
                  "tasks": TASKS, "include_path": str(REPO / "configs" / "tasks"), "n_trials": trials,
                  "seed": seed, "output_dir": str(run),
                  "routing": {"sources": ["merge", *skills], "scale": {"low": 0.5, "high": 1.5},
                              "n_trials": dfs_trials, "sampler": sampler}}
        path = out / f"psdfs_{seed}.yaml"
        path.write_text(yaml.safe_dump(config))
        started = time.time()
        assert main(["search", str(path), "--quiet"]) == 0
        seconds = time.time() - started
        board = pd.read_csv(run / "routing" / "leaderboard.csv")
        ps = board[board["model"].str.startswith("merge_trial")].iloc[0]
        best = board[board["role"].str.contains("best", na=False)].iloc[0]
        delta = {split: next(c for c in board.columns if c.startswith("Δ vs") and c.endswith(f"({split})"))
                 for split in ("search", "test")}
        assert "merge_trial" in delta["search"], delta  # Δ is against the best source: the merge
        layers = len(path_of_recipe(yaml.safe_load((run / "routing" / "best_recipe.yaml").read_text())))

        def ci(split):
            return (f"{best[delta[split]]:+.3f} [{best[f'Δ CI low ({split})']:+.3f}, "
                    f"{best[f'Δ CI high ({split})']:+.3f}]")
        print(f"| {seed} | {ps['average (search)']:.3f} | {best['average (search)']:.3f} | {ci('search')} | "
              f"{ps['average (test)']:.3f} | {best['average (test)']:.3f} | {ci('test')} | {layers} | {seconds:.0f} |",
              flush=True)
    return out / "psdfs_0"


def speed(run: Path) -> None:
    import optuna

    from search.report.storage import open_storage_read_only

    print("\n3. seconds per trial (median materialize, median evaluate)")
    storage = open_storage_read_only(run, f"sqlite:///{run / 'study.db'}")
    for name in ("psdfs", "psdfs-routing"):
        study = optuna.load_study(study_name=name, storage=storage)
        done = [t for t in study.trials if t.state == TrialState.COMPLETE and "materialize_seconds" in t.user_attrs
                and t.user_attrs.get("items")]
        m = statistics.median(t.user_attrs["materialize_seconds"] for t in done)
        e = statistics.median(t.user_attrs["eval_seconds"] for t in done)
        print(f"- {name}: materialize {m:.4f} s, evaluate {e:.3f} s, {1 / (m + e):.2f} trials/s "
              f"({len(done)} evaluated trials)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="deep", choices=["demo", "deep"])
    parser.add_argument("--samplers", default="tpe,cmaes,random")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--ps-trials", type=int, default=10)
    parser.add_argument("--dfs-trials", type=int, default=100)
    parser.add_argument("--dfs-sampler", default=None, help="the layer-path stage's sampler (default: nsga2)")
    parser.add_argument("--skip", default="", help="parts to skip: recovery,psdfs")
    args = parser.parse_args()
    fam = family(args.family)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if "recovery" not in args.skip:
            recovery(fam, args.samplers.split(","), args.seeds, args.trials, out)
        if "psdfs" not in args.skip:
            speed(ps_dfs(fam, args.ps_trials, args.dfs_trials, args.seeds, out, args.dfs_sampler))


if __name__ == "__main__":
    main()
