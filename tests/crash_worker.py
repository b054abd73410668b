"""A real search worker process with a cheap evaluator that can be held at a chosen scoring call.

``python -m tests.crash_worker CONFIG.yaml GATE_DIR [HOLD_AT]`` runs ``search.loop.search`` like
``evomerge search`` does, but scores a candidate by how close its weights are to a fixed task-arithmetic
target (milliseconds, no lm-eval), so the crash tests control *when* a worker dies: at scoring call
``HOLD_AT`` (1-based; the base and each fine-tune are scored first, as baselines) the worker writes
``GATE_DIR/held.<pid>`` and waits there until it is killed, interrupted or ``GATE_DIR/release.<pid>``
appears. Exit codes are the CLI's: 0, or 130 when interrupted.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

from evaluators import Scores, TaskScore

TARGET = (0.9, 0.2)
PAUSE_SECONDS = 0.05  # per scoring call, so that two workers' trials interleave


class GateEvaluator:
    def __init__(self, base: str, finetunes: list[str], gate_dir: Path, hold_at: int | None = None):
        from transformers import AutoModelForCausalLM

        base_sd, *ft_sds = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in [base, *finetunes])
        self.target = {n: base_sd[n] + sum(w * (ft[n] - base_sd[n]) for w, ft in zip(TARGET, ft_sds))
                       for n in base_sd}
        self.scale = sum(((ft[n] - base_sd[n]) ** 2).sum().item() for ft in ft_sds for n in base_sd)
        self.gate_dir, self.hold_at, self.calls = gate_dir, hold_at, 0

    def score(self, model, tokenizer) -> Scores:
        self.calls += 1
        if self.calls == self.hold_at:
            self._hold()
        return self._scores(self._closeness(model), 1)

    DOCUMENTS = 30

    def document_counts(self) -> dict[str, int]:
        return {"closeness": self.DOCUMENTS}

    def score_rungs(self, model, tokenizer, rungs):
        """Multi-fidelity: the same closeness at every rung, as if scored on that many documents. A worker held
        at this call waits after the first rung, in the middle of the candidate."""
        self.calls += 1
        value = self._closeness(model)
        for rung, size in enumerate(rungs):
            if rung == 1 and self.calls == self.hold_at:
                self._hold()
            yield self._scores(value, self.DOCUMENTS if size is None else size)

    def _closeness(self, model) -> float:
        time.sleep(PAUSE_SECONDS)
        state = model.state_dict()
        return math.exp(-sum(((state[n] - t) ** 2).sum().item() for n, t in self.target.items()) / self.scale)

    @staticmethod
    def _scores(value: float, documents: int) -> Scores:
        return Scores({"closeness": TaskScore({"score": value}, {"score": True}, {"score": [value] * documents},
                                              documents)}, 0.0)

    def _hold(self) -> None:
        pid = os.getpid()
        (self.gate_dir / f"held.{pid}").write_text(str(self.calls))
        while not (self.gate_dir / f"release.{pid}").exists():
            time.sleep(0.02)


def main(argv: list[str]) -> int:
    from search.config import load_search_config
    from search.loop import search

    config = load_search_config(argv[0])
    evaluator = GateEvaluator(config.base_model, config.models, Path(argv[1]),
                              int(argv[2]) if len(argv) > 2 else None)
    try:
        search(config, evaluator=evaluator, progress=False)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
