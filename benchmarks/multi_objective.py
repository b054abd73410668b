"""Which sampler a multi-objective, constrained search should default to, measured.

For every family × sampler × seed, one search over the space of configs/demo_no_regression.yaml (TIES weight
and density per fine-tune; two objectives: reversal, and the mean of capitalisation and next-letter; the
constraint every task ≥ its best source − 0.02) records each trial's objective values and feasibility. Per
sampler (median [min–max] over seeds):

- hypervolume of the feasible front after 20/40/60 trials, reference point (0, 0) (both objectives are exact
  match in [0, 1], so 1 is the whole square);
- the best average of a feasible trial after 20/40/60 trials (0 while a run has none), and the trials it
  took a feasible trial to first reach the single-objective optimum's average (— when a run never does);
- feasible trials among the 60, and seconds per trial (the sampler's own time included).

The same space searched with one objective (the average, cmaes, no constraint: what configs/demo.yaml runs)
gives the single-objective reference. Families: ``demo`` and ``deep`` (Gemma, 8 layers, width 96; see
benchmarks/search_efficiency.py).

    python benchmarks/multi_objective.py [--families demo,deep] [--samplers tpe,nsga2,gp,random] [--seeds 5]
    python benchmarks/multi_objective.py --render results/bench_multi_objective/runs.json   # the table again
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

from search.config import load_search_config  # noqa: E402
from search.loop import rank_value, search  # noqa: E402
from search.preflight import build_evaluator  # noqa: E402

SAMPLERS = ("tpe", "nsga2", "gp", "random")
CHECKPOINTS = (20, 40, 60)


def hypervolume_2d(points: list[tuple[float, float]], reference=(0.0, 0.0)) -> float:
    """Area dominated by ``points`` (both maximized) above ``reference``."""
    front = sorted({p for p in points if p[0] > reference[0] and p[1] > reference[1]}, key=lambda p: -p[0])
    area, best_y = 0.0, reference[1]
    for x, y in front:
        if y > best_y:
            area += (x - reference[0]) * (y - best_y)
            best_y = y
    return area


def family_paths(name: str) -> dict:
    from dataclasses import replace

    from search.demo import build_zoo, default_spec, ensure_zoo

    if name == "demo":
        zoo = ensure_zoo()
    else:
        spec = replace(default_spec(), architecture="gemma", num_layers=8, hidden_size=96, intermediate_size=192)
        zoo = build_zoo(REPO / "results" / "zoo-deep", spec, log=lambda m: print(f"  zoo-deep: {m}"))
    return {"base_model": str(zoo.base), "models": [str(p) for name, p in zoo.models.items() if name != "base"]}


def run(config, evaluator) -> dict:
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        config = config.model_copy(update={"output_dir": tmp, "storage": None})
        study = search(config, evaluator=evaluator, progress=False)
        trials = [t for t in study.get_trials(deepcopy=False) if "source" not in t.user_attrs]
        out = [{"values": list(t.values or []), "average": rank_value(t) if t.state == TrialState.COMPLETE else None,
                "feasible": t.user_attrs.get("feasible", True)} for t in trials]
    return {"trials": out, "seconds": time.time() - started}


def summarize(runs: list[dict], target: float) -> dict:
    def stat(xs):
        xs = [x for x in xs if x is not None]
        return (statistics.median(xs), min(xs), max(xs)) if xs else None

    out = {}
    for n in CHECKPOINTS:
        firsts = [[t for t in r["trials"][:n] if t["average"] is not None] for r in runs]
        if all(len(t["values"]) == 2 for ts in firsts for t in ts):
            fronts = [[tuple(t["values"]) for t in ts if t["feasible"]] for ts in firsts]
            out[f"hv@{n}"] = stat([hypervolume_2d(points) for points in fronts])
        else:
            out[f"hv@{n}"] = None  # one objective: no front
        # 0 while a run has no feasible trial yet: what it could hand a user at that point
        out[f"best@{n}"] = stat([max((t["average"] for t in ts if t["feasible"]), default=0.0) for ts in firsts])
    reach = []
    for r in runs:
        hit = next((i + 1 for i, t in enumerate(r["trials"]) if t["average"] is not None and t["feasible"]
                    and t["average"] >= target - 1e-9), None)
        reach.append(hit)
    out["trials to target"] = (statistics.median([x if x is not None else float("inf") for x in reach]),
                               sum(x is not None for x in reach), len(reach))
    out["feasible"] = stat([sum(t["feasible"] for t in r["trials"]) for r in runs])
    out["s/trial"] = stat([r["seconds"] / len(r["trials"]) for r in runs])
    return out


def fmt(cell) -> str:
    if cell is None:
        return "—"
    median, low, high = cell
    if isinstance(high, int) and not isinstance(median, float):
        return f"{median} [{low}–{high}]"
    return f"{median:.3f} [{low:.3f}–{high:.3f}]"


def table(raw: dict, trials: int) -> str:
    lines = []
    columns = [*(f"hv@{n}" for n in CHECKPOINTS), *(f"best@{n}" for n in CHECKPOINTS), "trials to target",
               "feasible", "s/trial"]
    for fam, runs_of in raw.items():
        reference = runs_of["single_cmaes"]
        target = max(t["average"] for r in reference for t in r["trials"] if t["average"] is not None)
        seeds = len(reference)
        lines.append(f"\n### {fam} family ({seeds} seeds, {trials} trials; target average {target:.3f})\n")
        lines.append("| sampler | " + " | ".join(columns) + " |")
        lines.append("|---|" + "---:|" * len(columns))
        for name, runs in runs_of.items():
            row = summarize(runs, target)
            cells = []
            for c in columns:
                if c == "trials to target":
                    median, hit, n = row[c]
                    cells.append(f"{median:g} ({hit}/{n} runs)" if median != float("inf") else f"— ({hit}/{n} runs)")
                else:
                    cells.append(fmt(row[c]))
            label = "single objective (cmaes, no constraint)" if name == "single_cmaes" else name
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="demo")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--out", default=str(REPO / "results" / "bench_multi_objective"))
    parser.add_argument("--render", default=None, help="print the table of a saved runs.json, run nothing")
    args = parser.parse_args()
    if args.render:
        print(table(json.loads(Path(args.render).read_text()), args.trials))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_search_config(REPO / "configs" / "demo_no_regression.yaml")
    raw = {}
    for fam in args.families.split(","):
        paths = family_paths(fam)
        config = base.model_copy(update={**paths, "include_path": str(REPO / "configs" / "tasks"),
                                         "n_trials": args.trials})
        evaluator = build_evaluator(config)
        single = config.model_copy(update={"objectives": None, "constraints": [], "sampler": "cmaes"})
        raw[fam] = {"single_cmaes": [run(single.model_copy(update={"seed": s}), evaluator) for s in range(args.seeds)]}
        for sampler in args.samplers.split(","):
            raw[fam][sampler] = [run(config.model_copy(update={"sampler": sampler, "seed": seed}), evaluator)
                                 for seed in range(args.seeds)]
            print(f"{fam} {sampler}: done", flush=True)
        (out / "runs.json").write_text(json.dumps(raw))
    text = table(raw, args.trials)
    print(text)
    (out / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
