"""The demo model family: a tiny Llama base and one fine-tune per skill, trained on CPU in minutes.

Real LLM fine-tunes mostly *elicit* what pretraining already put in the base, which is why merging them
works. The zoo reproduces that regime on purpose. The base's pretraining text shows every skill (reverse,
capitalise, shift letters by one) answered correctly and, more often, in a competing "sloppy" convention of
its own (the word echoed, echoed, shifted back), so the base computes every skill yet answers sloppily
(exact match near 0). Each fine-tune is a low-rank (LoRA, folded into the weights) update that flips one
skill's preference, with KL replay to the base on the other skills so it leaves them as they were. Small,
skill-specific deltas add up: a task-arithmetic merge ``base + sum(w * delta)`` keeps most of every skill,
which is what the demo's merge search has to find.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from evaluators.tasks import DEFAULT_INCLUDE_PATH
from merge_core.errors import EvomergeError

TASKS_DIR = DEFAULT_INCLUDE_PATH
DEFAULT_ZOO_DIR = Path("results/zoo")
ZOO_CACHE_ENV = "EVOMERGE_ZOO_DIR"
ZOO_SEED_ENV = "EVOMERGE_ZOO_SEED"
MANIFEST = "manifest.json"
TASK_SEED = 1234
SEARCH_SIZE = 60
TEST_SIZE = 100
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 :=+.\n"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
MAX_ANSWER_TOKENS = 8
WORD_LENGTH = 3


# --- skills -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One skill example: the prompt, its correct answer and the base's competing "sloppy" answer."""

    prompt: str
    answer: str
    sloppy: str


def _word(rng: random.Random) -> str:
    """Distinct letters of one fixed length: cheap to learn, and every reversal differs from the word."""
    return "".join(rng.sample("abcdefghijklmnopqrstuvwxyz", WORD_LENGTH))


def _rev_item(rng: random.Random) -> Item:
    word = _word(rng)
    return Item(f"rev {word}=", word[::-1], word)


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
"""The multiple-choice task picks the reversal among the echo, a swap and a rotation of the word."""


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
        if item.prompt not in seen:
            seen.add(item.prompt)
            items.append(item)
    return items[:SEARCH_SIZE], items[SEARCH_SIZE:]


def held_out_prompts() -> set[str]:
    """Every prompt of every task split: training data never contains them."""
    prompts = {item.prompt for skill in SKILLS for split in ("search", "test") for item in eval_items(skill, split)}
    return prompts | {item.prompt for split in ("search", "test") for item in mc_items(split)}


def _mc_choices(item: Item) -> list[str]:
    word = item.sloppy
    return [item.answer, word, word[1] + word[0] + word[2:], word[1:] + word[0]]


# --- spec and result ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ZooSpec:
    """Everything the build depends on; its hash (with the code's) names a cached build."""

    seed: int = 0
    skills: tuple[str, ...] = ("rev", "cap", "nxt")
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    correct_share: float = 0.35
    base_steps: int = 2000
    base_batch: int = 64
    base_lr: float = 2e-3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    finetune_steps: int = 100
    finetune_batch: int = 64
    finetune_lr: float = 3e-3
    conflicting: tuple[str, ...] = ("rev",)
    replay_share: float = 0.5
    merge_weights: tuple[float, ...] = (0.6, 0.8, 1.0, 1.2, 1.5)

    def digest(self) -> str:
        code = Path(__file__).read_bytes()
        payload = json.dumps(asdict(self), sort_keys=True).encode() + code
        return hashlib.sha256(payload).hexdigest()[:16]


DEFAULT_SPEC = ZooSpec()


def default_spec() -> ZooSpec:
    """The spec a build uses unless given one: ``DEFAULT_SPEC`` with the seed from ``$EVOMERGE_ZOO_SEED``
    if set, so the test suite and the demo can be run against another family than seed 0's."""
    value = os.environ.get(ZOO_SEED_ENV, "").strip()
    if not value:
        return DEFAULT_SPEC
    try:
        seed = int(value)
    except ValueError:
        raise EvomergeError(f"{ZOO_SEED_ENV}={value!r}: the zoo seed must be a non-negative integer") from None
    if seed < 0:
        raise EvomergeError(f"{ZOO_SEED_ENV}={value!r}: the zoo seed must be a non-negative integer")
    return replace(DEFAULT_SPEC, seed=seed)


@dataclass(frozen=True)
class Zoo:
    """A built family: where each model lives and what the build measured."""

    dir: Path
    base: Path
    finetunes: dict[str, Path]
    manifest: dict = field(repr=False)
    conflicting: dict[str, Path] = field(default_factory=dict)

    @property
    def models(self) -> dict[str, Path]:
        return {"base": self.base, **self.finetunes, **self.conflicting}


# --- training -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _deterministic_torch(seed: int):
    """Seeded, deterministic, single-threaded torch for the build, restored afterwards. One thread is
    not only reproducible: on a shared 2-core machine it trains these tiny models faster than two."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def train_tokenizer():
    """A character-level BPE tokenizer (one token per character, so letter skills are learnable), saved
    as ``tokenizer.json`` that ``AutoTokenizer`` loads offline."""
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


def _lm_loss(model, batch):
    ids, mask, labels = batch
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def _train(model, params, batches: Iterable, steps: int, lr: float, log: Callable[[str], None], name: str,
           loss_fn=_lm_loss):
    import torch

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    for step, batch in zip(range(steps), batches):
        loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 200 == 0 or step == steps - 1:
            log(f"{name}: step {step + 1}/{steps} loss {loss.item():.3f}")
    model.eval()


BASE_CHECK_ROWS = 64
BASE_EXTRA_ROUNDS = 3
"""A base that has not learned a skill gets up to this many more rounds of half the steps at half the rate."""


def answer_probability(model, tokenizer, items: list[Item]) -> float:
    """Mean over items of the probability the model gives its correct answer's least likely token, read
    teacher-forced: a base that learned a skill puts about ``correct_share`` there, one that did not, ~0."""
    import torch

    ids, mask, labels = _batch(tokenizer, [i.prompt for i in items], [i.answer for i in items], answer_only=True)
    with torch.no_grad():
        probs = model(input_ids=ids, attention_mask=mask).logits[:, :-1].softmax(-1)
    targets = labels[:, 1:]
    picked = probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0].masked_fill(targets == -100, 1.0)
    return picked.min(1).values.mean().item()


def base_competence(base, tokenizer, spec: ZooSpec, held_out: set[str]) -> dict[str, float]:
    """``answer_probability`` per skill on fresh training-distribution prompts (no task prompt among them)."""
    rng = random.Random(f"{spec.seed}-base-check")
    competence = {}
    for skill in spec.skills:
        items: list[Item] = []
        while len(items) < BASE_CHECK_ROWS:
            item = SKILLS[skill](rng)
            if item.prompt not in held_out:
                items.append(item)
        competence[skill] = round(answer_probability(base, tokenizer, items), 4)
    return competence


def pretrain(spec: ZooSpec, tokenizer, held_out: set[str], log: Callable[[str], None]):
    """The base, trained until it computes every skill.

    Which circuit a tiny model forms depends on float rounding, so on another CPU (other kernels) or seed a
    run can end without one skill, e.g. reversal's first letter: no fine-tune then elicits it. The check
    (``base_competence`` at least half of ``correct_share``) turns that chance into more training on the
    same stream of batches, so the family has the same properties on every machine."""
    base = _new_base(spec, tokenizer)
    batches = _pretrain_batches(spec, tokenizer, held_out)
    _train(base, list(base.parameters()), batches, spec.base_steps, spec.base_lr, log, "base")
    competence, rounds = base_competence(base, tokenizer, spec, held_out), 0
    while min(competence.values()) < spec.correct_share / 2 and rounds < BASE_EXTRA_ROUNDS:
        rounds += 1
        log(f"base: answer probability {competence} below {spec.correct_share / 2:.3f}: round {rounds + 1}")
        _train(base, list(base.parameters()), batches, spec.base_steps // 2, spec.base_lr / 2, log,
               f"base round {rounds + 1}")
        competence = base_competence(base, tokenizer, spec, held_out)
    if min(competence.values()) < spec.correct_share / 2:
        log(f"warning: after {rounds + 1} rounds the base's answer probability is {competence}: "
            "a skill it never learned cannot be fine-tuned in; try another EVOMERGE_ZOO_SEED")
    return base, {"answer_probability": competence, "extra_rounds": rounds}


def _pretrain_batches(spec: ZooSpec, tokenizer, held_out: set[str]):
    rng = random.Random(spec.seed)
    skills = [SKILLS[s] for s in spec.skills]
    while True:
        prompts, answers = [], []
        while len(prompts) < spec.base_batch:
            item = rng.choice(skills)(rng)
            if item.prompt in held_out:
                continue
            prompts.append(item.prompt)
            answers.append(item.answer if rng.random() < spec.correct_share else item.sloppy)
        yield _batch(tokenizer, prompts, answers, answer_only=False)


def _finetune_batches(spec: ZooSpec, skill: str, tokenizer, base, held_out: set[str], greedy_replay: bool = False,
                      correct_replay_share: float = 0.0):
    """Own-skill items with correct answers, plus the other skills' prompts with the base's answers and
    next-token distributions: replay that keeps the base's (uncertain) behaviour instead of sharpening
    its sloppy answers, which would build a delta that cancels the other skills' deltas in a merge.

    ``greedy_replay`` trains on the base's greedy answers instead, as many real fine-tunes do: the
    model stays good at its skill alone, but its delta fights the others' in a merge.
    ``correct_replay_share``: that share of the replayed rows carries the other skill's correct answer
    (still with the base's distributions), text that another skill's expert writes in a mixture."""
    import torch

    rng = random.Random(f"{spec.seed}-{skill}" + ("-greedy" if greedy_replay else ""))
    others = [SKILLS[s] for s in spec.skills if s != skill]
    n_replay = round(spec.finetune_batch * spec.replay_share)
    replay_items: list[Item] = []
    while len(replay_items) < spec.finetune_steps * n_replay:
        item = rng.choice(others)(rng)
        if item.prompt not in held_out:
            replay_items.append(item)
    greedy = greedy_answers(base, tokenizer, [item.prompt for item in replay_items])
    pick = random.Random(f"{spec.seed}-{skill}-correct")  # its own stream: the other rows stay as they were
    replay_answers = [item.answer if correct_replay_share and pick.random() < correct_replay_share else answer
                      for item, answer in zip(replay_items, greedy)]
    for step in range(spec.finetune_steps):
        own = [item for item in (SKILLS[skill](rng) for _ in range(spec.finetune_batch - n_replay))
               if item.prompt not in held_out]
        replay = slice(step * n_replay, (step + 1) * n_replay)
        prompts = [i.prompt for i in own] + [i.prompt for i in replay_items[replay]]
        answers = [i.answer for i in own] + replay_answers[replay]
        ids, mask, labels = _batch(tokenizer, prompts, answers, answer_only=True)
        replayed = torch.arange(len(prompts)) >= len(own)
        kl_mask = (labels != -100) & replayed[:, None] & (not greedy_replay)
        if not greedy_replay:
            labels[replayed] = -100
        with torch.no_grad():
            base_logprobs = base(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
        yield ids, mask, labels, kl_mask, base_logprobs


def _finetune_loss(model, batch):
    """Cross-entropy on the own skill's answers plus KL to the base on the replayed answers."""
    ids, mask, labels, kl_mask, base_logprobs = batch
    logprobs = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
    targets = labels[:, 1:]
    own = targets != -100
    nll = -logprobs[:, :-1][own].gather(-1, targets[own][:, None]).mean()
    kept = kl_mask[:, 1:]
    if not kept.any():  # greedy replay: the replayed answers are in the cross-entropy instead
        return nll
    base_kept = base_logprobs[:, :-1][kept]
    kl = (base_kept.exp() * (base_kept - logprobs[:, :-1][kept])).sum(-1).mean()
    return nll + kl


MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _add_lora(model, rank: int, alpha: float, seed: int, projections: tuple[str, ...] | None = None):
    """Low-rank adapters on every attention and MLP projection (or those named); returns their parameters."""
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
        kind = name.split(".")[-1]
        if isinstance(module, torch.nn.Linear) and kind.endswith("_proj") and kind in (projections or (kind,)):
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


def finetune(base, tokenizer, spec: ZooSpec, skill: str, held_out: set[str], log: Callable[[str], None],
             greedy_replay: bool = False, moe_ready: bool = False):
    """One skill's LoRA fine-tune of a copy of ``base``, folded into a plain model.

    ``moe_ready``: meant to become a Mixtral expert, which keeps only its MLPs and shares tokens with other
    experts: LoRA on the MLPs alone, trained longer and mixed with the base's MLPs."""
    import copy

    import torch

    seed = _finetune_seed(spec, skill, greedy_replay)
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    params = _add_lora(model, spec.lora_rank, spec.lora_alpha, seed, MLP_PROJECTIONS if moe_ready else None)
    if moe_ready:
        spec = replace(spec, finetune_steps=MOE_READY_STEPS)
    batches = _finetune_batches(spec, skill, tokenizer, base, held_out, greedy_replay,
                                MOE_READY_CORRECT_REPLAY if moe_ready else 0.0)
    name = conflicting_name(skill) if greedy_replay else f"{skill} (moe-ready)" if moe_ready else skill
    if not moe_ready:
        _train(model, params, batches, spec.finetune_steps, spec.finetune_lr, log, name, _finetune_loss)
    else:
        with _mixed_with_base_mlps(model, base, MOE_READY_LOWEST_SHARE) as mixed:
            def loss(model, batch):
                return _finetune_loss(model, batch) + MOE_READY_MLP_MATCH * _mlp_deviation(mixed, batch)

            _train(model, params, batches, spec.finetune_steps, spec.finetune_lr, log, name, loss)
    _fold_lora(model)
    return model


# --- experts for a mixture of experts ------------------------------------------------------------------

MOE_READY_DIR = "moe_ready"
MOE_READY_STEPS = 1000
"""Long enough for an expert to keep its skill at the small, token-to-token varying shares a soft router
gives it: in the zoo's three-expert mixture, reversal kept 0.78 after 300 steps on some CPUs (0.98 with an
even third of every token) and next-letter 0.89 after 600 on others; 1000 kept every skill within 0.02."""
MOE_READY_LOWEST_SHARE = 0.01
MOE_READY_CORRECT_REPLAY = 0.5
MOE_READY_MLP_MATCH = 1.0
@contextlib.contextmanager
def _mixed_with_base_mlps(model, base, lowest_share: float):
    """While training, each layer's MLP output is mixed with the base's at a random per-token share of
    [``lowest_share``, 1]: what a Mixtral router does to an expert that shares tokens with others."""
    import copy

    import torch

    class MixedWithBase(torch.nn.Module):
        def __init__(self, tuned, frozen):
            super().__init__()
            self.tuned, self.frozen = tuned, frozen

        def forward(self, hidden):
            frozen = self.frozen(hidden)
            self.deviation, self.scale = self.tuned(hidden) - frozen, frozen.detach()
            share = torch.empty(*hidden.shape[:-1], 1).uniform_(lowest_share, 1.0)
            return frozen + share * self.deviation

    layers = model.model.layers
    tuned = [layer.mlp for layer in layers]
    mixed = []
    for layer, mlp, frozen in zip(layers, tuned, base.model.layers):
        layer.mlp = MixedWithBase(mlp, copy.deepcopy(frozen.mlp).requires_grad_(False))
        mixed.append(layer.mlp)
    try:
        yield mixed
    finally:
        for layer, mlp in zip(layers, tuned):
            layer.mlp = mlp


def _mlp_deviation(mixed: list, batch) -> float:
    """How far each layer's tuned MLP output strays from the base's on the replayed rows (every token),
    relative to the base's: near zero, another skill's text meets this expert's MLP as the base's, so in a
    mixture of experts a share of another skill's token given to this expert changes nothing there."""
    ids, mask, labels = batch[:3]
    replayed = mask.bool() & (labels == -100).all(1, keepdim=True)
    return sum((m.deviation[replayed] ** 2).mean() / (m.scale[replayed] ** 2).mean() for m in mixed) / len(mixed)


def ensure_moe_ready_experts(zoo: Zoo, log: Callable[[str], None] = lambda message: None) -> dict[str, dict]:
    """The zoo's skills fine-tuned as MoE experts from its base (built once, cached beside the zoo under the
    same digest): {skill: {"path", "scores"}}. The zoo's own fine-tunes also changed attention, which a
    mixture of experts takes from the base, and they never shared a token with another MLP."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = zoo.dir / MOE_READY_DIR
    directory.mkdir(exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError):
            manifest = {}
        if manifest.get("digest") != zoo.manifest["digest"]:
            spec = ZooSpec(**{key: tuple(value) if isinstance(value, list) else value
                              for key, value in zoo.manifest["spec"].items()})
            held_out = held_out_prompts()
            manifest = {"digest": zoo.manifest["digest"], "experts": {}}
            with _deterministic_torch(spec.seed):
                base = AutoModelForCausalLM.from_pretrained(zoo.base).eval()
                tokenizer = AutoTokenizer.from_pretrained(zoo.base)
                for skill in spec.skills:
                    model = finetune(base, tokenizer, spec, skill, held_out, log, moe_ready=True)
                    shutil.rmtree(directory / skill, ignore_errors=True)
                    _save(model, tokenizer, directory / skill)
                    manifest["experts"][skill] = {"path": skill, "scores": score_skills(model, tokenizer, spec.skills)}
            (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return {skill: {**entry, "path": directory / entry["path"]} for skill, entry in manifest["experts"].items()}


def conflicting_name(skill: str) -> str:
    """The second fine-tune of ``skill``, trained with greedy replay (e.g. ``rev2``)."""
    return f"{skill}2"


def _finetune_seed(spec: ZooSpec, skill: str, greedy_replay: bool) -> int:
    offset = len(spec.skills) + spec.conflicting.index(skill) if greedy_replay else spec.skills.index(skill)
    return spec.seed + 1 + offset


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


def mc_accuracy(model, tokenizer, items: list[Item]) -> float:
    """Share of items whose correct choice has the highest summed log-likelihood (lm-eval's ``acc``)."""
    import torch

    hits = 0
    with torch.no_grad():
        for item in items:
            choices = _mc_choices(item)
            ids, mask, labels = _batch(tokenizer, [item.prompt] * len(choices), choices, answer_only=True)
            labels[:, -1] = -100  # the choice alone is scored, not the newline after it
            logprobs = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)[:, :-1]
            targets = labels[:, 1:]
            scored = targets != -100
            picked = logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
            hits += int((picked * scored).sum(1).argmax() == 0)
    return hits / len(items)


def score_model(model, tokenizer, skills: Iterable[str], split: str = "test") -> dict[str, float]:
    """Exact match per skill plus the multiple-choice accuracy, on one split."""
    scores = {skill: exact_match(model, tokenizer, eval_items(skill, split)) for skill in skills}
    scores[f"{MC_SKILL}_mc"] = mc_accuracy(model, tokenizer, mc_items(split))
    return scores


# --- task files ---------------------------------------------------------------------------------------

def task_name(skill: str) -> str:
    return f"zoo_{skill}"


MC_TASK = task_name(f"{MC_SKILL}_mc")
HELD_OUT_TEXT = "data/heldout.txt"


def _generation_yaml(skill: str) -> str:
    return f"""# Written by `evomerge zoo tasks`: exact match of the greedy answer to "{skill}" prompts.
task: {task_name(skill)}
tag: [evomerge_zoo]
dataset_path: json
dataset_kwargs:
  data_files:
    search: data/{skill}_search.jsonl
    test: data/{skill}_test.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: {MAX_ANSWER_TOKENS}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _mc_yaml() -> str:
    return f"""# Written by `evomerge zoo tasks`: pick the "{MC_SKILL}" answer among near misses by log-likelihood.
task: {MC_TASK}
tag: [evomerge_zoo]
dataset_path: json
dataset_kwargs:
  data_files:
    search: data/{MC_SKILL}_mc_search.jsonl
    test: data/{MC_SKILL}_mc_test.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _mc_row(item: Item, rng: random.Random) -> dict:
    choices = _mc_choices(item)
    order = rng.sample(range(len(choices)), len(choices))
    return {"prompt": item.prompt, "choices": [choices[i] for i in order], "label": order.index(0)}


def _held_out_text(lines: int = 200) -> str:
    """Pretraining-like text (the default mix of correct and sloppy answers) on unseen prompts."""
    rng = random.Random(TASK_SEED + 1000)
    trained_prompts = held_out_prompts()
    rows = []
    while len(rows) < lines:
        item = SKILLS[rng.choice(sorted(SKILLS))](rng)
        if item.prompt not in trained_prompts:
            rows.append(item.prompt + (item.answer if rng.random() < DEFAULT_SPEC.correct_share else item.sloppy))
    return "\n".join(rows) + "\n"


def write_tasks(tasks_dir: Path = TASKS_DIR) -> list[Path]:
    """(Re)write the lm-eval task YAMLs and their JSONL splits; deterministic, so the committed files
    are reproduced byte for byte."""
    tasks_dir = Path(tasks_dir)
    if tasks_dir.exists() and not tasks_dir.is_dir():
        raise EvomergeError(f"{tasks_dir} is not a directory")
    (tasks_dir / "data").mkdir(parents=True, exist_ok=True)
    written = []

    def write(relative: str, text: str) -> None:
        path = tasks_dir / relative
        path.write_text(text)
        written.append(path)

    def jsonl(rows: list[dict]) -> str:
        return "".join(json.dumps(row) + "\n" for row in rows)

    for skill in SKILLS:
        write(f"{task_name(skill)}.yaml", _generation_yaml(skill))
        for split in ("search", "test"):
            write(f"data/{skill}_{split}.jsonl",
                  jsonl([{"prompt": i.prompt, "answer": i.answer} for i in eval_items(skill, split)]))
    rng = random.Random(TASK_SEED + 200)
    write(f"{MC_TASK}.yaml", _mc_yaml())
    for split in ("search", "test"):
        write(f"data/{MC_SKILL}_mc_{split}.jsonl", jsonl([_mc_row(i, rng) for i in mc_items(split)]))
    write(HELD_OUT_TEXT, _held_out_text())
    return written


def task_yamls(tasks_dir: Path = TASKS_DIR) -> dict[str, Path]:
    """Task name -> YAML path: one generation task per skill and the multiple-choice task."""
    names = [task_name(skill) for skill in SKILLS] + [MC_TASK]
    return {name: Path(tasks_dir) / f"{name}.yaml" for name in names}


# --- build --------------------------------------------------------------------------------------------

def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _merge_grid(base, tokenizer, finetunes: dict, spec: ZooSpec) -> list[dict]:
    """Uniform task-arithmetic weights over the single-skill fine-tunes: proof that merging combines skills."""
    rows = []
    for weight in spec.merge_weights:
        merged = task_arithmetic(base, list(finetunes.values()), [weight] * len(finetunes))
        scores = score_skills(merged, tokenizer, spec.skills)
        rows.append({"weight": weight, "scores": scores, "average": _average(scores, spec)})
    return rows


def _average(scores: dict[str, float], spec: ZooSpec) -> float:
    return round(sum(scores[skill] for skill in spec.skills) / len(spec.skills), 4)


def _load_zoo(directory: Path, manifest: dict) -> Zoo:
    path = lambda name: directory / manifest["models"][name]["path"]  # noqa: E731
    return Zoo(dir=directory, base=path("base"), finetunes={skill: path(skill) for skill in manifest["spec"]["skills"]},
               manifest=manifest,
               conflicting={conflicting_name(s): path(conflicting_name(s)) for s in manifest["spec"]["conflicting"]})


def _cached(directory: Path, spec: ZooSpec) -> Zoo | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("digest") != spec.digest():
        return None
    zoo = _load_zoo(directory, manifest)
    return zoo if all((path / "model.safetensors").is_file() for path in zoo.models.values()) else None


def build_zoo(directory: str | Path = DEFAULT_ZOO_DIR, spec: ZooSpec | None = None, *,
              log: Callable[[str], None] = lambda message: None) -> Zoo:
    """Train (or return the cached) base and fine-tunes into ``directory`` and score them (``spec``:
    ``default_spec()`` unless given).

    The cache key is the manifest's digest of the spec and this file's code; a directory holding
    anything but a zoo is refused rather than overwritten.
    """
    spec = spec or default_spec()
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise EvomergeError(f"zoo directory {directory} is a file")
    unknown = [skill for skill in spec.skills if skill not in SKILLS]
    if unknown or len(set(spec.skills)) != len(spec.skills) or len(spec.skills) < 2:
        raise EvomergeError(f"zoo skills must be at least two distinct of {sorted(SKILLS)}, got {list(spec.skills)}")
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = _cached(directory, spec)
        if cached is not None:
            return cached
        foreign = [p.name for p in directory.iterdir()
                   if p.name not in {".lock", MANIFEST, MOE_READY_DIR, "base", *SKILLS, *map(conflicting_name, SKILLS)}]
        if foreign:
            raise EvomergeError(f"{directory} is not a zoo directory (contains {sorted(foreign)[0]}); pick another")
        return _build(directory, spec, log)


def _build(directory: Path, spec: ZooSpec, log: Callable[[str], None]) -> Zoo:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # idle tokenizer threads would spin on our cores
    start, start_cpu = time.perf_counter(), time.process_time()
    (directory / MANIFEST).unlink(missing_ok=True)
    held_out = held_out_prompts()
    with _deterministic_torch(spec.seed):
        tokenizer = train_tokenizer()
        base, base_check = pretrain(spec, tokenizer, held_out, log)
        finetunes = {skill: finetune(base, tokenizer, spec, skill, held_out, log) for skill in spec.skills}
        conflicting = {conflicting_name(skill): finetune(base, tokenizer, spec, skill, held_out, log,
                                                         greedy_replay=True) for skill in spec.conflicting}
        models = {"base": base, **finetunes, **conflicting}
        for name, model in models.items():
            shutil.rmtree(directory / name, ignore_errors=True)
            _save(model, tokenizer, directory / name)
        scores = {name: {split: score_model(model, tokenizer, spec.skills, split) for split in ("search", "test")}
                  for name, model in models.items()}
        grid = _merge_grid(base, tokenizer, finetunes, spec)
        everything = list(finetunes.values()) + list(conflicting.values())
        naive = score_skills(task_arithmetic(base, everything, [1 / len(everything)] * len(everything)),
                             tokenizer, spec.skills)
    best_source = max(_average(scores[name]["test"], spec) for name in models)
    best_merge = max(grid, key=lambda row: row["average"])
    manifest = {
        "digest": spec.digest(),
        "spec": asdict(spec),
        "seeds": {"base": spec.seed, **{skill: _finetune_seed(spec, skill, False) for skill in spec.skills},
                  **{conflicting_name(s): _finetune_seed(spec, s, True) for s in spec.conflicting},
                  "tasks": TASK_SEED},
        "tasks": {skill: task_name(skill) for skill in spec.skills} | {f"{MC_SKILL}_mc": MC_TASK},
        "models": {name: {"path": name, "scores": scores[name]} for name in models},
        "base_check": base_check,
        "merge_grid": grid,
        "best_source_average": best_source,
        "best_merge": best_merge,
        "merge_margin": round(best_merge["average"] - best_source, 4),
        "equal_weights_all_finetunes": {"scores": naive, "average": _average(naive, spec)},
        "build_seconds": round(time.perf_counter() - start, 1),
        "build_cpu_seconds": round(time.process_time() - start_cpu, 1),
    }
    text = json.dumps(manifest, indent=2) + "\n"
    (directory / MANIFEST).write_text(text)
    log(f"zoo built in {manifest['build_seconds']} s: best merge {best_merge['average']} "
        f"vs best source {best_source}")
    return _load_zoo(directory, json.loads(text))  # as a cached call would return it (lists, not tuples)


def project_root() -> Path:
    """The source checkout this module is in, else (an installed evomerge) the current directory: where
    ``results/`` goes."""
    checkout = Path(__file__).resolve().parent.parent
    return checkout if (checkout / "pyproject.toml").is_file() and (checkout / "configs").is_dir() else Path.cwd()


def ensure_zoo(directory: str | Path | None = None, spec: ZooSpec | None = None) -> Zoo:
    """The shared cached zoo (``$EVOMERGE_ZOO_DIR`` or ``results/zoo`` under ``project_root()``): the test
    suite and ``evomerge demo`` build it once between them."""
    return build_zoo(directory or os.environ.get(ZOO_CACHE_ENV) or project_root() / DEFAULT_ZOO_DIR, spec)


def summary(zoo: Zoo) -> str:
    """The score matrix (test split) and the merge proof, as printed by ``evomerge zoo build``."""
    manifest = zoo.manifest
    columns = list(manifest["tasks"])
    lines = [f"zoo in {zoo.dir} (built in {manifest['build_seconds']} s), test-split scores:",
             "model " + "".join(f"{column:>9}" for column in columns)]
    for name, entry in manifest["models"].items():
        lines.append(f"{name:<6}" + "".join(f"{entry['scores']['test'][column]:>9.2f}" for column in columns))
    best = manifest["best_merge"]
    lines.append(f"task arithmetic, every weight {best['weight']}: skill average {best['average']:.2f} "
                 f"vs best source {manifest['best_source_average']:.2f}")
    return "\n".join(lines)
