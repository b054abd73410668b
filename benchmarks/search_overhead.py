"""What a search trial spends beyond evaluation: the demo search (configs/demo.yaml) in a fresh SQLite study.

Each trial's wall time runs from the end of the previous trial to the end of this one, so it holds everything
the loop does: Optuna's ask (CMA-ES sampling), parameter and attribute writes, materializing the candidate
in memory, scoring it and the tell. Materialization and scoring are timed inside the trial; the rest is
bookkeeping. The first trial (the hand-written recipe) is left out: it also fills the search cache.

    python benchmarks/search_overhead.py [--trials 60]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from search.config import load_search_config  # noqa: E402
from search.demo import ensure_zoo  # noqa: E402
from search.loop import search  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--trials", type=int, default=60)
    args = parser.parse_args(argv)
    ensure_zoo()
    ends: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = load_search_config(args.config).model_copy(
            update={"n_trials": args.trials, "storage": f"sqlite:///{tmp}/study.db"})
        study = search(config, config_dir=REPO, progress=False,
                       on_trial=lambda study, frozen: ends.append(time.perf_counter()))
        trials = sorted(study.trials, key=lambda t: t.number)
    walls = [b - a for a, b in zip(ends, ends[1:])]
    materialize = [t.user_attrs["materialize_seconds"] for t in trials[1:]]
    evaluate = [t.user_attrs["eval_seconds"] for t in trials[1:]]
    bookkeeping = [w - m - e for w, m, e in zip(walls, materialize, evaluate)]
    wall = statistics.mean(walls)
    print(f"{len(walls)} trials of {args.config.name}, mean per trial:")
    for name, values in (("materialize", materialize), ("evaluate", evaluate), ("bookkeeping", bookkeeping)):
        print(f"  {name:12s} {1000 * statistics.mean(values):6.1f} ms  {statistics.mean(values) / wall:6.1%}")
    print(f"  {'trial':12s} {1000 * wall:6.1f} ms; overhead beyond evaluation "
          f"{(wall - statistics.mean(evaluate)) / wall:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
