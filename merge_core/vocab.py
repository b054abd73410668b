"""Tokenizer merging: one output vocabulary, and every model's token-indexed rows moved onto it.

Models whose tokenizers differ (added tokens, another order) cannot be merged row by row: row ``i`` of
one embedding is not the same token as row ``i`` of another. As mergekit does, the recipe's
``tokenizer_source`` (``union``, ``base`` or a model) or ``tokenizer:`` block picks the output vocabulary;
each model's embedding and LM-head rows are then permuted to it before the merge method runs, and rows
for tokens a model lacks are filled (from the one model that has the token, the base, the average of the
models that have it, zeros, or what ``tokenizer.tokens`` says). Rows of tokens every model has are the
models' own, so they merge exactly as without a tokenizer rule.

Deterministic where mergekit 0.1.5 is not: the base tokenizer is ``base_model`` or else the first model
(mergekit picks an arbitrary one), and union tokens join in model order, then token-id order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from merge_core.errors import EvomergeError
from merge_core.recipe import ModelTokenSource, Recipe, TokenEmbedding, ZeroTokenSource


@dataclass
class Vocabulary:
    """The output tokenizer and, per model, the source row of every output token (-1: the model lacks it)."""

    tokenizer: object  # transformers.PreTrainedTokenizerBase
    token_ids: dict[str, int]
    rows: int  # output rows: the vocabulary, padded to ``pad_to_multiple_of``
    source_rows: dict[str, torch.Tensor]
    model_vocabs: dict[str, dict[str, int]]
    rules: dict[str, TokenEmbedding]
    tokens: dict[int, str] = field(init=False)

    def __post_init__(self):
        self.tokens = {i: t for t, i in self.token_ids.items()}

    def align(self, models: list[str], tensors: list[torch.Tensor], base: int | None) -> list[torch.Tensor]:
        """Each model's rows permuted to the output vocabulary, missing rows filled (vocabulary is axis 0)."""
        widths = {tuple(t.shape[1:]) for t in tensors}
        if len(widths) > 1:
            raise EvomergeError(f"token-indexed tensors of {', '.join(models)} differ beyond the vocabulary axis")
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        tensors = [t.to(dtype) for t in tensors]
        fills = self._fills(models, tensors, base)
        out = []
        for model, tensor in zip(models, tensors):
            rows = self.source_rows[model]
            aligned = torch.zeros((self.rows, *tensor.shape[1:]), dtype=dtype, device=tensor.device)
            own = torch.nonzero(rows >= 0).flatten()
            aligned[own] = tensor[rows[own]]
            for token_id, fill in fills.items():
                if rows[token_id] < 0 or self._forced(token_id):
                    aligned[token_id] = fill
            if self.rows > len(self.token_ids):
                aligned[len(self.token_ids):] = aligned[:len(self.token_ids)].mean(dim=0)
            out.append(aligned)
        return out

    def _forced(self, token_id: int) -> bool:
        rule = self.rules.get(self.tokens[token_id])
        return bool(rule and rule.force)

    def _fills(self, models: list[str], tensors: list[torch.Tensor], base: int | None) -> dict[int, torch.Tensor]:
        """The row given to models that lack a token (or to all, when its rule is forced)."""
        present = torch.stack([self.source_rows[m] >= 0 for m in models])
        needed = torch.nonzero(~present.all(dim=0)).flatten().tolist()
        needed += [self.token_ids[t] for t, r in self.rules.items() if r.force and self.token_ids[t] not in needed]
        fills = {}
        for token_id in needed:
            token = self.tokens[token_id]
            holders = [i for i in range(len(models)) if present[i, token_id]]
            rule = self.rules.get(token)
            if rule is not None and rule.source is not None:
                fills[token_id] = self._rule_row(token, rule, models, tensors)
            elif not holders:
                fills[token_id] = tensors[0].new_zeros(tensors[0].shape[1:])
            elif len(holders) == 1 or (base is not None and base in holders):
                donor = holders[0] if len(holders) == 1 else base
                fills[token_id] = tensors[donor][self.source_rows[models[donor]][token_id]]
            else:
                total = tensors[0].new_zeros(tensors[0].shape[1:])
                for i in holders:
                    total = total + tensors[i][self.source_rows[models[i]][token_id]]
                fills[token_id] = total / len(holders)
        return fills

    def _rule_row(self, token: str, rule: TokenEmbedding, models: list[str],
                  tensors: list[torch.Tensor]) -> torch.Tensor:
        if isinstance(rule.source, ZeroTokenSource):
            return tensors[0].new_zeros(tensors[0].shape[1:])
        model = rule.source.model if isinstance(rule.source, ModelTokenSource) else rule.source
        tensor = tensors[models.index(model)]
        if isinstance(rule.source, ModelTokenSource):
            row = rule.source.token_id
            if row is None:
                row = self.model_vocabs[model][rule.source.token]
        else:
            row = int(self.source_rows[model][self.token_ids[token]])
        return tensor[row]


def tokenizer_rule(recipe: Recipe) -> tuple[str, dict[str, TokenEmbedding]] | None:
    """(source, per-token rules) when the recipe merges tokenizers, else None (the base's is copied)."""
    if recipe.tokenizer is not None:
        return recipe.tokenizer.source, dict(recipe.tokenizer.tokens or {})
    if recipe.tokenizer_source is not None:
        return recipe.tokenizer_source, {}
    return None


def _load_tokenizer(path: Path, model: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
        raise EvomergeError(f"model {model}: cannot load its tokenizer ({type(exc).__name__})") from None


def _check_rules(rules: dict[str, TokenEmbedding], models: list[str]) -> None:
    for token, rule in rules.items():
        source = rule.source
        model = source.model if isinstance(source, ModelTokenSource) else source
        if isinstance(model, str) and model not in models:
            raise EvomergeError(f"tokenizer.tokens.{token}.source: {model} is not one of the recipe's models")
        if isinstance(source, ModelTokenSource) and (source.token is None) == (source.token_id is None):
            raise EvomergeError(f"tokenizer.tokens.{token}.source: give exactly one of token or token_id")


def _check_rule_rows(rules: dict[str, TokenEmbedding], token_ids: dict[str, int], source_rows: dict[str, torch.Tensor],
                     model_vocabs: dict[str, dict[str, int]], vocab_sizes: dict[str, int]) -> None:
    """Every row a token rule names exists in its model."""
    for token, rule in rules.items():
        source = rule.source
        where = f"tokenizer.tokens.{token}.source"
        if isinstance(source, ModelTokenSource) and source.token is not None \
                and source.token not in model_vocabs[source.model]:
            raise EvomergeError(f"{where}: token {source.token!r} is not in {source.model}'s vocabulary")
        if isinstance(source, ModelTokenSource) and source.token_id is not None \
                and not 0 <= source.token_id < vocab_sizes[source.model]:
            raise EvomergeError(f"{where}: token_id {source.token_id} is outside {source.model}'s "
                                f"{vocab_sizes[source.model]} rows")
        if isinstance(source, str) and source_rows[source][token_ids[token]] < 0:
            raise EvomergeError(f"{where}: {source} has no token {token!r}")


def _union(base_tokenizer, tokenizers: dict, vocab_sizes: dict[str, int]) -> None:
    """Add to ``base_tokenizer`` every token another model has (special tokens keep their settings)."""
    known = set(base_tokenizer.get_vocab())
    for model, tokenizer in tokenizers.items():
        added = tokenizer.added_tokens_decoder
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if index >= vocab_sizes[model] or token in known:
                continue
            base_tokenizer.add_tokens(added.get(index, token))
            known.add(token)


def build_vocabulary(recipe: Recipe, paths: dict[str, Path], configs: dict[str, dict]) -> Vocabulary | None:
    """The output vocabulary for ``recipe`` (None when it has no tokenizer rule)."""
    rule = tokenizer_rule(recipe)
    if rule is None:
        return None
    source, rules = rule
    models = recipe.referenced_models()
    if source not in ("union", "base") and source not in models:
        raise EvomergeError(f"tokenizer source {source!r} is not one of the recipe's models")
    _check_rules(rules, models)
    tokenizers = {m: _load_tokenizer(paths[m], m) for m in models}
    vocab_sizes = {m: configs[m].get("vocab_size") or len(tokenizers[m]) for m in models}
    base = recipe.base_model or models[0]
    out_model = base if source in ("union", "base") else source
    output = _load_tokenizer(paths[out_model], out_model)  # a fresh copy: adding tokens must not touch the others
    if source == "union":
        _union(output, tokenizers, vocab_sizes)
    for token in rules:
        if token not in output.get_vocab():
            output.add_tokens(token)
    token_ids = output.get_vocab()
    rows = len(token_ids)
    pad = recipe.tokenizer.pad_to_multiple_of if recipe.tokenizer else None
    if pad and rows % pad:
        rows += pad - rows % pad
    model_vocabs = {m: t.get_vocab() for m, t in tokenizers.items()}
    source_rows = {}
    for m in models:
        mapping = torch.full((len(token_ids),), -1, dtype=torch.long)
        for token, token_id in token_ids.items():
            index = model_vocabs[m].get(token, -1)
            if index < vocab_sizes[m]:
                mapping[token_id] = index
        source_rows[m] = mapping
    _check_rule_rows(rules, token_ids, source_rows, model_vocabs, vocab_sizes)
    return Vocabulary(output, token_ids, rows, source_rows, model_vocabs, rules)
