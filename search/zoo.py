"""The demo model family: a tiny Llama base and one fine-tune per skill, trained on CPU in minutes.

Real LLM fine-tunes mostly *elicit* what pretraining already put in the base, which is why merging them
works. The zoo reproduces that regime on purpose: the base's pretraining text shows every skill both
answered correctly and in a competing "sloppy" convention (sums with their digits reversed, words echoed
instead of reversed or capitalised), with the sloppy one more frequent. The base therefore computes every
skill internally yet answers sloppily (exact match near 0). Each fine-tune is a small low-rank (LoRA,
folded into the weights) update that flips one skill's preference, trained with replay of the base's own
answers on the other skills so it leaves them alone. Such deltas are small and nearly orthogonal, so a
task-arithmetic merge ``base + sum(w * delta)`` keeps most of every skill: the point of the demo.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from merge_core.errors import EvomergeError

REPO_ROOT = Path(__file__).resolve().parent.parent
TASKS_DIR = REPO_ROOT / "configs" / "tasks"
DEFAULT_ZOO_DIR = Path("results/zoo")
ZOO_CACHE_ENV = "EVOMERGE_ZOO_DIR"
MANIFEST = "manifest.json"
TASK_SEED = 1234
SEARCH_SIZE = 60
TEST_SIZE = 100
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 :=+.\n"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
MAX_ANSWER_TOKENS = 8


# --- skills -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One skill example: the prompt, its correct answer and the base's competing "sloppy" answer."""

    prompt: str
    answer: str
    sloppy: str


def _word(rng: random.Random) -> str:
    """Four distinct letters: fixed length keeps the skills cheap to learn, distinct letters keep
    every reversal different from the word itself."""
    return "".join(rng.sample("abcdefghijklmnopqrstuvwxyz", 4))


def _rev_item(rng: random.Random) -> Item:
    word = _word(rng)
    return Item(f"rev {word}=", word[::-1], word[1:] + word[0])


def _cap_item(rng: random.Random) -> Item:
    word = _word(rng)
    return Item(f"cap {word}=", word.upper(), word)


def _next_item(rng: random.Random) -> Item:
    word = _word(rng)
    return Item(f"nxt {word}=", _shift(word, 1), _shift(word, -1))


def _shift(word: str, by: int) -> str:
    return "".join(chr((ord(c) - ord("a") + by) % 26 + ord("a")) for c in word)


SKILLS: dict[str, Callable[[random.Random], Item]] = {"rev": _rev_item, "cap": _cap_item, "nxt": _next_item}
MC_SKILL = "rev"
"""The multiple-choice task picks the reversal among the echo and two other shuffles of the word."""

_NOUNS = "cat dog fox owl bee ant cow hen yak elk".split()
_ADJECTIVES = "red big old shy calm wild tiny blue".split()
_VERBS = "sees likes finds hears".split()


def _sentence(rng: random.Random) -> str:
    """Short filler prose, so the base is a language model and not only a skill table."""
    return f"a {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} a {rng.choice(_NOUNS)}."


def _is_ambiguous(item: Item) -> bool:
    """An item whose correct and sloppy answers agree cannot tell skill from sloppiness."""
    return item.answer == item.sloppy


def eval_items(skill: str, split: str, seed: int = TASK_SEED) -> list[Item]:
    """The fixed search/test items of a skill: distinct prompts, disjoint across splits, never trained on."""
    search, test = _split_items(SKILLS[skill], seed + sorted(SKILLS).index(skill))
    return {"search": search, "test": test}[split]


def mc_items(split: str, seed: int = TASK_SEED) -> list[Item]:
    """Items of the multiple-choice task: other prompts of the same skill than its generation task."""
    search, test = _split_items(SKILLS[MC_SKILL], seed + 100)
    return {"search": search, "test": test}[split]


def _split_items(make: Callable[[random.Random], Item], seed: int) -> tuple[list[Item], list[Item]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    items: list[Item] = []
    while len(items) < SEARCH_SIZE + TEST_SIZE:
        item = make(rng)
        if item.prompt not in seen and not _is_ambiguous(item):
            seen.add(item.prompt)
            items.append(item)
    return items[:SEARCH_SIZE], items[SEARCH_SIZE:]


def held_out_prompts() -> set[str]:
    """Every prompt of every task split: training data never contains them."""
    prompts = {item.prompt for skill in SKILLS for split in ("search", "test") for item in eval_items(skill, split)}
    return prompts | {item.prompt for split in ("search", "test") for item in mc_items(split)}


def _mc_choices(item: Item) -> list[str]:
    word = item.answer[::-1]
    return [item.answer, item.sloppy, word, word[1] + word[0] + word[3] + word[2]]


# --- spec and result ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ZooSpec:
    """Everything the build depends on; its hash (with the code's) names a cached build."""

    seed: int = 0
    skills: tuple[str, ...] = ("rev", "cap", "nxt")
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    correct_share: float = 0.35
    prose_share: float = 0.2
    base_steps: int = 1200
    base_batch: int = 128
    base_lr: float = 3e-3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    finetune_steps: int = 150
    finetune_batch: int = 64
    finetune_lr: float = 3e-3
    replay_share: float = 0.5
    merge_weights: tuple[float, ...] = (0.6, 0.8, 1.0, 1.2, 1.5)

    def digest(self) -> str:
        code = Path(__file__).read_bytes()
        payload = json.dumps(asdict(self), sort_keys=True).encode() + code
        return hashlib.sha256(payload).hexdigest()[:16]


DEFAULT_SPEC = ZooSpec()


@dataclass(frozen=True)
class Zoo:
    """A built family: where each model lives and what the build measured."""

    dir: Path
    base: Path
    finetunes: dict[str, Path]
    manifest: dict = field(repr=False)

    @property
    def models(self) -> dict[str, Path]:
        return {"base": self.base, **self.finetunes}


# --- training -----------------------------------------------------------------------------------------

def _torch_setup(seed: int):
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    return torch


def train_tokenizer():
    """A character-level tokenizer: digits and letters stay single tokens, so the skills are learnable."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=len(ALPHABET) + len(SPECIAL_TOKENS), special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=list(ALPHABET), show_progress=False)
    tok.train_from_iterator([ALPHABET], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def _new_base(spec: ZooSpec, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
                         intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                         num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
                         max_position_embeddings=64, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def _batch(tokenizer, prompts: list[str], answers: list[str], answer_only: bool):
    """Token ids, attention mask and labels for prompt+answer+newline rows (loss on answers if asked)."""
    import torch

    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer([p + a + "\n" for p, a in zip(prompts, answers)], add_special_tokens=False)["input_ids"]
    width = max(map(len, full_ids))
    ids = torch.full((len(full_ids), width), tokenizer.pad_token_id)
    labels = torch.full((len(full_ids), width), -100)
    for row, (prompt, full) in enumerate(zip(prompt_ids, full_ids)):
        ids[row, :len(full)] = torch.tensor(full)
        start = len(prompt) if answer_only else 0
        labels[row, start:len(full)] = torch.tensor(full[start:])
    return ids, (ids != tokenizer.pad_token_id).long(), labels


def _train(model, params, batches: Iterable, steps: int, lr: float, log: Callable[[str], None], name: str):
    import torch

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    for step, (ids, mask, labels) in zip(range(steps), batches):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 200 == 0 or step == steps - 1:
            log(f"{name}: step {step + 1}/{steps} loss {loss.item():.3f}")
    model.eval()


def _pretrain_batches(spec: ZooSpec, tokenizer, held_out: set[str]):
    rng = random.Random(spec.seed)
    skills = [SKILLS[s] for s in spec.skills]
    while True:
        prompts, answers = [], []
        while len(prompts) < spec.base_batch:
            if rng.random() < spec.prose_share:
                prompts.append("")
                answers.append(_sentence(rng))
                continue
            item = rng.choice(skills)(rng)
            if item.prompt in held_out:
                continue
            prompts.append(item.prompt)
            answers.append(item.answer if rng.random() < spec.correct_share else item.sloppy)
        yield _batch(tokenizer, prompts, answers, answer_only=False)


def _finetune_batches(spec: ZooSpec, skill: str, tokenizer, replay: Callable[[list[str]], list[str]],
                      held_out: set[str]):
    """Own-skill items with correct answers, mixed with the base's own answers on the other skills."""
    rng = random.Random(f"{spec.seed}-{skill}")
    others = [SKILLS[s] for s in spec.skills if s != skill]
    n_replay = round(spec.finetune_batch * spec.replay_share)
    while True:
        own = [item for item in (SKILLS[skill](rng) for _ in range(spec.finetune_batch - n_replay))
               if item.prompt not in held_out]
        other_prompts = [rng.choice(others)(rng).prompt for _ in range(n_replay)]
        other_prompts = [p for p in other_prompts if p not in held_out]
        prompts = [i.prompt for i in own] + other_prompts
        answers = [i.answer for i in own] + replay(other_prompts)
        yield _batch(tokenizer, prompts, answers, answer_only=True)


def _add_lora(model, rank: int, alpha: float, seed: int):
    """Low-rank adapters on every attention and MLP projection; returns their parameters."""
    import torch
    from torch.nn.utils import parametrize

    class LoRA(torch.nn.Module):
        def __init__(self, out_features: int, in_features: int, gen: torch.Generator):
            super().__init__()
            self.down = torch.nn.Parameter(torch.randn(rank, in_features, generator=gen) / math.sqrt(in_features))
            self.up = torch.nn.Parameter(torch.zeros(out_features, rank))

        def forward(self, weight):
            return weight + (alpha / rank) * (self.up @ self.down)

    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1].endswith("_proj"):
            lora = LoRA(*module.weight.shape, gen)
            parametrize.register_parametrization(module, "weight", lora)
            params += [lora.down, lora.up]
    return params


def _fold_lora(model) -> None:
    """Bake the adapters into the weights: the fine-tune becomes a plain checkpoint."""
    import torch
    from torch.nn.utils import parametrize

    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)


# --- evaluation ---------------------------------------------------------------------------------------

def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = MAX_ANSWER_TOKENS) -> list[str]:
    """Greedy continuations cut at the first newline, prompts batched by token length (no padding)."""
    import torch

    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(index)
    newline = tokenizer.convert_tokens_to_ids("\n")
    answers = [""] * len(prompts)
    with torch.no_grad():
        for indices in by_length.values():
            ids = torch.tensor([encoded[i] for i in indices])
            start = ids.shape[1]
            for _ in range(max_new_tokens):
                next_ids = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, next_ids], dim=1)
                if (ids[:, start:] == newline).any(1).all():
                    break
            for row, i in enumerate(indices):
                answers[i] = tokenizer.decode(ids[row, start:]).split("\n")[0]
    return answers


def exact_match(model, tokenizer, items: list[Item]) -> float:
    answers = greedy_answers(model, tokenizer, [item.prompt for item in items])
    return sum(a == item.answer for a, item in zip(answers, items)) / len(items)


def score_skills(model, tokenizer, skills: Iterable[str], split: str = "test") -> dict[str, float]:
    return {skill: exact_match(model, tokenizer, eval_items(skill, split)) for skill in skills}


def finetune(base, tokenizer, spec: ZooSpec, skill: str, held_out: set[str], log: Callable[[str], None]):
    """One skill's LoRA fine-tune of a copy of ``base``, folded into a plain model."""
    import copy

    import torch

    torch.manual_seed(spec.seed + 1 + spec.skills.index(skill))
    model = copy.deepcopy(base)
    params = _add_lora(model, spec.lora_rank, spec.lora_alpha, spec.seed + 1 + spec.skills.index(skill))
    replay = lambda prompts: greedy_answers(base, tokenizer, prompts)  # noqa: E731
    batches = _finetune_batches(spec, skill, tokenizer, replay, held_out)
    _train(model, params, batches, spec.finetune_steps, spec.finetune_lr, log, skill)
    _fold_lora(model)
    return model


def task_arithmetic(base, finetunes: list, weights: list[float]):
    """``base + sum(w * (finetune - base))`` over every tensor: the merge the family must support."""
    import copy

    import torch

    merged = copy.deepcopy(base)
    state = merged.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            delta = sum(w * (ft.state_dict()[name] - tensor) for ft, w in zip(finetunes, weights))
            tensor.add_(delta)
    return merged
