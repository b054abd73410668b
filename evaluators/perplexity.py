"""Perplexity of a held-out text: a cheap, generation-free check that a merge did not break language modelling."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from evaluators.base import Scores, TaskScore
from evaluators.loading import ensure_on_device
from merge_core.errors import EvomergeError


class PerplexityEvaluator:
    """Token-weighted perplexity over the first ``max_tokens`` tokens of ``text_file``.

    The tokens are cut into consecutive chunks of ``context_length`` tokens, or of the model's
    ``max_position_embeddings`` if shorter (each chunk scored from its own start, its first token only as
    context), so every model of a family is scored on exactly the same tokens. Per-chunk values are kept as
    samples: ``nll`` (mean negative log-likelihood per token), and for ``perplexity``, a corpus-level metric,
    each chunk's log-likelihood with its token count in ``counts`` (see ``TaskScore``).
    """

    def __init__(self, text_file: str | Path, *, max_tokens: int = 4096, context_length: int = 256,
                 batch_size: int = 8, device: str = "cpu", task_name: str | None = None) -> None:
        self.path = Path(text_file)
        if not self.path.is_file():
            raise EvomergeError(f"perplexity text file {self.path} not found")
        if context_length < 2 or max_tokens < context_length:
            raise EvomergeError(f"need context_length >= 2 and max_tokens >= context_length, "
                                f"got {context_length} and {max_tokens}")
        try:
            self.text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise EvomergeError(f"perplexity text file {self.path} is not UTF-8 text") from None
        except OSError as exc:
            raise EvomergeError(f"perplexity text file {self.path} cannot be read: {exc.strerror}") from None
        if batch_size < 1:
            raise EvomergeError(f"batch_size must be >= 1, got {batch_size}")
        from merge_core.runtime import check_device  # here: importing evaluators stays free of torch

        check_device(device)
        self.max_tokens = max_tokens
        self.context_length = context_length
        self.batch_size = batch_size
        self.device = device
        self.task_name = task_name or f"perplexity:{self.path.name}"
        self._chunks: tuple[Any, Any] | None = None

    @property
    def metric_names(self) -> dict[str, list[str]]:
        return {self.task_name: ["perplexity", "nll"]}

    def metric_directions(self) -> dict[str, dict[str, bool]]:
        return {self.task_name: {"perplexity": False, "nll": False}}

    def _chunks_for(self, tokenizer: Any, length: int) -> Any:
        """The token chunks, cut once per tokenizer and chunk length."""
        import torch

        if self._chunks is not None and self._chunks[0][0] is tokenizer and self._chunks[0][1] == length:
            return self._chunks[1]
        ids = tokenizer(self.text, add_special_tokens=False)["input_ids"][: self.max_tokens]
        if len(ids) < 2:
            raise EvomergeError(f"{self.path} has fewer than 2 tokens")
        chunks = [torch.tensor(ids[i:i + length]) for i in range(0, len(ids), length)]
        chunks = [c for c in chunks if len(c) >= 2]
        self._chunks = ((tokenizer, length), chunks)
        return chunks

    def score(self, model: Any, tokenizer: Any) -> Scores:
        import torch

        start = time.perf_counter()
        ensure_on_device(model, self.device)
        length = min(self.context_length, getattr(model.config, "max_position_embeddings", None) or self.context_length)
        chunks = self._chunks_for(tokenizer, length)
        nll_sums, counts = [], []
        with torch.inference_mode():
            for i in range(0, len(chunks), self.batch_size):
                batch = chunks[i:i + self.batch_size]
                ids = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True).to(self.device)
                mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(c) for c in batch], batch_first=True)
                mask = mask.to(self.device)
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                targets, target_mask = ids[:, 1:], mask[:, 1:].float()
                token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
                nll_sums += (token_nll * target_mask).sum(dim=1).tolist()
                counts += target_mask.sum(dim=1).tolist()
        mean_nll = sum(nll_sums) / sum(counts)
        chunk_nll = [s / c for s, c in zip(nll_sums, counts)]
        task = TaskScore(metrics={"perplexity": math.exp(mean_nll), "nll": mean_nll},
                         higher_is_better={"perplexity": False, "nll": False},
                         samples={"perplexity": [-x for x in nll_sums], "nll": chunk_nll},
                         n=len(chunks), counts={"perplexity": list(counts)})
        return Scores(tasks={self.task_name: task}, seconds=time.perf_counter() - start)
