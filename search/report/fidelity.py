"""What multi-fidelity did in a study: where pruned candidates stopped, and the item-evaluations it saved."""

from __future__ import annotations

from collections import Counter

import optuna
from optuna.trial import TrialState

from search.config import SearchConfig

__all__ = ["fidelity_facts"]


def fidelity_facts(study: optuna.Study, config: SearchConfig) -> dict[str, str]:
    """Report facts: the rungs, how many candidates stopped after each, and item-evaluations spent against
    what scoring every candidate in full would have cost (warm starts told from the baselines excluded)."""
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
              if "source" not in t.user_attrs and not t.user_attrs.get("surplus")]
    spent = sum(int(t.user_attrs.get("items", 0)) for t in trials)
    facts = {"item-evaluations": f"{spent}"}
    if config.fidelity is None:
        return facts
    full = max((int(t.user_attrs.get("items", 0)) for t in trials if t.state == TrialState.COMPLETE), default=0)
    stopped = Counter(int(t.user_attrs.get("rung", 0)) + 1 for t in trials if t.state == TrialState.PRUNED)
    facts["fidelity"] = (f"rungs {config.fidelity.rungs} (documents per task), {config.fidelity.pruner}, "
                         f"reduction factor {config.fidelity.reduction_factor}")
    facts["pruned"] = ", ".join(f"{n} after rung {rung}" for rung, n in sorted(stopped.items())) or "none"
    if full:
        saved = 1 - spent / (full * len(trials))
        facts["item-evaluations"] = (f"{spent} of {full * len(trials)} had every candidate been scored in full "
                                     f"({saved:.0%} saved)")
    return facts
