"""How fast each sampler and fidelity setting gets to the optimum, in trials, item-evaluations and seconds.

For every family × sampler × fidelity setting × seed, one search of ``--trials`` trials over the demo's space
(configs/demo.yaml: TIES weight and density per fine-tune, 8 dimensions) records each trial's value, the
documents it scored and when it ended. Per setting (median [min–max] over seeds):

- best objective after 15/30/60/120 trials (complete trials only: a pruned trial's value is a subset's);
- best objective after a fixed budget of item-evaluations (``--item-budget`` full evaluations' worth);
- gain@60: (best after 60 trials − hand-written) / (reference − hand-written), the share of the reachable
  improvement over the hand-written recipe found within 60 trials;
- items / seconds to come within 0.01 of the reference optimum (— when a run never does).

The reference optimum of a family is the best value any run of any setting found (the space's optimum is
unknown; exact match caps it at 1). Families: ``demo`` (the 2-layer Llama family `evomerge demo` uses) and
``deep`` (a family the search was not tuned on: Gemma, 8 layers, 96 wide, same skills, built with the same
trainer). Prints a Markdown table and writes it, the raw runs (JSON) and a plot of best-so-far against
item-evaluations (median over seeds per setting; the sources and the hand-written recipe as lines) under
``--out``.

    python benchmarks/search_efficiency.py [--families demo,deep] [--samplers cmaes,tpe,...] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from optuna.trial import TrialState  # noqa: E402

from search.config import Fidelity, load_search_config  # noqa: E402
from search.demo import build_zoo, default_spec, ensure_zoo  # noqa: E402
from search.loop import search  # noqa: E402
from search.preflight import build_evaluator  # noqa: E402

SAMPLERS = ("cmaes", "cmaes_ipop", "cmaes_bipop", "tpe", "gp", "random")
FIDELITY = {"full": None, "sha": {"rungs": [7, 20, "all"], "pruner": "successive_halving", "reduction_factor": 3},
            "hyperband": {"rungs": [7, 20, "all"], "pruner": "hyperband", "reduction_factor": 3}}
CHECKPOINTS = (15, 30, 60, 120)
CLOSE = 0.01


def family(name: str):
    if name == "demo":
        return ensure_zoo()
    spec = replace(default_spec(), architecture="gemma", num_layers=8, hidden_size=96, intermediate_size=192)
    return build_zoo(REPO / "results" / "zoo-deep", spec, log=lambda message: print(f"  zoo-deep: {message}"))


def run(config, evaluator) -> dict:
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        study = search(config.model_copy(update={"storage": f"sqlite:///{tmp}/study.db", "output_dir": tmp}),
                       evaluator=evaluator, progress=False)
        trials = sorted((t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                         and "source" not in t.user_attrs), key=lambda t: t.number)
        return {"trials": [{"state": t.state.name, "value": t.value, "items": t.user_attrs.get("items", 0),
                            "end": t.datetime_complete.timestamp() - started,
                            "handwritten": bool(t.user_attrs.get("handwritten"))} for t in trials],
                "baselines": {k: b["objective"] for k, b in study.user_attrs["baselines"].items()}}


def curves(result: dict) -> tuple[list[float], list[int], list[float]]:
    """Best complete value so far, cumulative items and seconds, after each trial."""
    best, items, seconds, so_far, spent = [], [], [], float("-inf"), 0
    for t in result["trials"]:
        spent += t["items"]
        if t["state"] == "COMPLETE":
            so_far = max(so_far, t["value"])
        best.append(so_far)
        items.append(spent)
        seconds.append(t["end"])
    return best, items, seconds


def summarize(runs: list[dict], reference: float, item_budget: int) -> dict[str, list]:
    rows: dict[str, list] = {f"best@{k}": [] for k in CHECKPOINTS}
    rows.update({"best@items": [], "gain@60": [], "items to ref": [], "seconds to ref": [], "items spent": []})
    for result in runs:
        best, items, seconds = curves(result)
        handwritten = next(t["value"] for t in result["trials"] if t["handwritten"])
        for k in CHECKPOINTS:
            rows[f"best@{k}"].append(best[min(k, len(best)) - 1])
        within = [b for b, i in zip(best, items) if i <= item_budget]
        rows["best@items"].append(within[-1] if within else float("nan"))
        span = reference - handwritten
        rows["gain@60"].append((best[min(60, len(best)) - 1] - handwritten) / span if span > 0 else 1.0)
        hit = next((j for j, b in enumerate(best) if b >= reference - CLOSE), None)
        rows["items to ref"].append(items[hit] if hit is not None else None)
        rows["seconds to ref"].append(seconds[hit] if hit is not None else None)
        rows["items spent"].append(items[-1])
    return rows


FORMATS = {"items to ref": "{:.0f}", "items spent": "{:.0f}", "seconds to ref": "{:.1f}"}


def shown(column: str, values: list) -> str:
    """median [min–max] over seeds; how many seeds never got there."""
    found = [v for v in values if v is not None and v == v]
    if not found:
        return "—"
    fmt = FORMATS.get(column, "{:.3f}").format
    missed = len(values) - len(found)
    return (f"{fmt(statistics.median(found))} [{fmt(min(found))}–{fmt(max(found))}]"
            + (f" ({missed} never)" if missed else ""))


def valid(setting: str) -> bool:
    """Settings a config accepts (gp refuses a pruner: it learns from complete trials only)."""
    sampler, fidelity = setting.split(" / ")[:2]
    return not (sampler == "gp" and fidelity != "full")


def table(name: str, results: dict, item_budget: int, full_items: int) -> list[str]:
    reference = max(t["value"] for runs in results.values() for r in runs for t in r["trials"]
                    if t["state"] == "COMPLETE")
    first = next(iter(results.values()))[0]
    handwritten = next(t["value"] for t in first["trials"] if t["handwritten"])
    seeds = len(next(iter(results.values())))
    lines = [f"### {name}: reference optimum {reference:.3f}, hand-written {handwritten:.3f}, best source "
             f"{max(first['baselines'].values()):.3f}; a full evaluation = {full_items} items; "
             f"{len(first['trials'])} trials, {seeds} seeds", "",
             "| setting | " + " | ".join(f"best@{k}" for k in CHECKPOINTS)
             + f" | best within {item_budget} evaluations' items | gain@60 | items to ref−{CLOSE} "
             f"| s to ref−{CLOSE} | items spent |",
             "|---" * (len(CHECKPOINTS) + 6) + "|"]
    for setting, runs in results.items():
        if valid(setting):
            rows = summarize(runs, reference, item_budget * full_items)
            lines.append(f"| {setting} | " + " | ".join(shown(c, v) for c, v in rows.items()) + " |")
    return lines + [""]


def plot(name: str, results: dict, reference: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 5))
    grid = None
    for setting, runs in results.items():
        curves_ = [curves(r) for r in runs]
        top = max(i[-1] for _, i, _ in curves_)
        grid = np.linspace(0, top, 200)
        ys = [np.interp(grid, i, [b if b > float("-inf") else np.nan for b in best]) for best, i, _ in curves_]
        ax.plot(grid, np.nanmedian(ys, axis=0), label=setting)
    first = next(iter(results.values()))[0]
    handwritten = next(t["value"] for t in first["trials"] if t["handwritten"])
    ax.axhline(handwritten, color="black", linestyle=":", label="hand-written")
    for i, (label, value) in enumerate(first["baselines"].items()):
        ax.axhline(value, color="grey", linestyle="--", linewidth=0.8, alpha=0.5 + 0.1 * i)
    ax.axhline(reference, color="green", linewidth=0.8, label="reference optimum")
    ax.set(xlabel="item-evaluations", ylabel="best objective (search split)",
           title=f"{name}: best so far, median over seeds (grey: sources)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)


def render(name: str, out: Path, item_budget: int) -> list[str]:
    """The table and plot of one family, from its saved runs."""
    results = {k: v for k, v in json.loads((out / f"{name}.json").read_text()).items() if valid(k)}
    full_items = max(t["items"] for runs in results.values() for r in runs for t in r["trials"]
                     if t["state"] == "COMPLETE")
    reference = max(t["value"] for runs in results.values() for r in runs for t in r["trials"]
                    if t["state"] == "COMPLETE")
    plot(name, results, reference, out)
    return table(name, results, item_budget, full_items)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="demo,deep")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--fidelity", default="full,sha")
    parser.add_argument("--warm-start", default="handwritten", help="handwritten, sources (adds the sources), or both")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=120)
    parser.add_argument("--item-budget", type=int, default=30, help="in full evaluations' worth of items")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "search_efficiency")
    parser.add_argument("--render", action="store_true", help="only remake the table and plots from saved runs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in args.families.split(","):
        if args.render:
            lines += render(name, args.out, args.item_budget)
            continue
        zoo = family(name)
        base = load_search_config(REPO / "configs" / "demo.yaml")
        config = base.model_copy(update={
            "base_model": str(zoo.base), "models": [str(zoo.models[Path(m).name]) for m in base.models],
            "include_path": str(REPO / "configs" / "tasks"), "n_trials": args.trials})
        evaluator = build_evaluator(config)
        results: dict[str, list[dict]] = {}
        for sampler in args.samplers.split(","):
            for fidelity, warm_start in ((f, w) for f in args.fidelity.split(",") for w in args.warm_start.split(",")):
                setting = f"{sampler} / {fidelity}" + (" / +sources" if warm_start == "sources" else "")
                if not valid(setting):
                    continue
                warm_start = ["handwritten", "sources"] if warm_start == "sources" else ["handwritten"]
                results[setting] = []
                for seed in range(args.seeds):
                    began = time.perf_counter()
                    results[setting].append(run(config.model_copy(update={
                        "sampler": sampler, "seed": seed,
                        "fidelity": FIDELITY[fidelity] and Fidelity.model_validate(FIDELITY[fidelity]),
                        "warm_start": warm_start}), evaluator))
                    print(f"{name} {setting} seed {seed}: {time.perf_counter() - began:.1f} s", flush=True)
        (args.out / f"{name}.json").write_text(json.dumps(results))
        lines += render(name, args.out, args.item_budget)
        print("\n".join(lines), flush=True)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print(f"written: {args.out}/table.md, *.json, *.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
