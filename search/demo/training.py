"""How the demo family is trained: the tokenizer, the base's pretraining and its competence check, the LoRA
fine-tunes (clean and conflicting), the MoE-ready experts, all under seeded, deterministic torch.

``train_family`` and ``train_moe_ready_experts`` are the whole build in its order of random draws, and the
family is measured (``scoring.family_figures``) under the same single-threaded settings, so a build is the
same byte for byte on one machine; the cache key covers this module (see ``search.demo.spec``).
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from merge_core.errors import EvomergeError
from search.demo.items import SKILLS, Item, held_out_prompts
from search.demo.scoring import encode_rows, family_figures, greedy_answers, score_skills
from search.demo.spec import ZooSpec

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 :=+.\n"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


# --- tokenizer, base and its pretraining --------------------------------------------------------------

@contextlib.contextmanager
def deterministic_torch(seed: int):
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


# Architectures a family can have. Gemma differs from Llama in its norms (1 + weight), scaled embeddings and
# GELU MLPs, and its registered tokenizer class leaves the family's own in charge (transformers 5 loads
# Qwen2's and Phi-3's model-type tokenizer whatever tokenizer_config.json says, which drops the spaces).
ARCHITECTURES = ("llama", "gemma")


def _new_base(spec: ZooSpec, tokenizer):
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

    if spec.architecture not in ARCHITECTURES:
        raise EvomergeError(f"zoo architecture {spec.architecture!r}: use one of {', '.join(ARCHITECTURES)}")
    shared = dict(vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                  num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                  num_key_value_heads=spec.num_heads, max_position_embeddings=64, tie_word_embeddings=True,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if spec.architecture == "gemma":
        config, model_class = GemmaConfig(head_dim=spec.hidden_size // spec.num_heads, **shared), GemmaForCausalLM
    else:
        config, model_class = LlamaConfig(**shared), LlamaForCausalLM
    return model_class(config)


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

    ids, mask, labels = encode_rows(tokenizer, [i.prompt for i in items], [i.answer for i in items], answer_only=True)
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
    batches = pretrain_batches(spec, tokenizer, held_out)
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


def pretrain_batches(spec: ZooSpec, tokenizer, held_out: set[str]):
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
        yield encode_rows(tokenizer, prompts, answers, answer_only=False)


# --- fine-tunes ---------------------------------------------------------------------------------------

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
        ids, mask, labels = encode_rows(tokenizer, prompts, answers, answer_only=True)
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


def conflicting_name(skill: str) -> str:
    """The second fine-tune of ``skill``, trained with greedy replay (e.g. ``rev2``)."""
    return f"{skill}2"


def finetune_seed(spec: ZooSpec, skill: str, greedy_replay: bool) -> int:
    """The torch seed of a fine-tune (its LoRA init and its own draws), recorded in the manifest."""
    offset = len(spec.skills) + spec.conflicting.index(skill) if greedy_replay else spec.skills.index(skill)
    return spec.seed + 1 + offset


def finetune(base, tokenizer, spec: ZooSpec, skill: str, held_out: set[str], log: Callable[[str], None],
             greedy_replay: bool = False, moe_ready: bool = False):
    """One skill's LoRA fine-tune of a copy of ``base``, folded into a plain model.

    ``moe_ready``: meant to become a Mixtral expert, which keeps only its MLPs and shares tokens with other
    experts: LoRA on the MLPs alone, trained longer and mixed with the base's MLPs."""
    import copy

    import torch

    seed = finetune_seed(spec, skill, greedy_replay)
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


# --- the build ------------------------------------------------------------------------------------------

@dataclass
class TrainedFamily:
    """A family in memory, as ``train_family`` trained and measured it (``figures``: ``family_figures``)."""

    tokenizer: object
    base: object
    base_check: dict
    finetunes: dict = field(default_factory=dict)
    conflicting: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)

    @property
    def models(self) -> dict:
        return {"base": self.base, **self.finetunes, **self.conflicting}


def train_family(spec: ZooSpec, log: Callable[[str], None]) -> TrainedFamily:
    """The tokenizer, the base, one fine-tune per skill and the conflicting ones, trained in this order
    (which fixes every random draw) and then measured, all in one ``deterministic_torch(spec.seed)``: on
    one thread the scores are as reproducible as the weights."""
    held_out = held_out_prompts()
    with deterministic_torch(spec.seed):
        tokenizer = train_tokenizer()
        base, base_check = pretrain(spec, tokenizer, held_out, log)
        finetunes = {skill: finetune(base, tokenizer, spec, skill, held_out, log) for skill in spec.skills}
        conflicting = {conflicting_name(skill): finetune(base, tokenizer, spec, skill, held_out, log,
                                                         greedy_replay=True) for skill in spec.conflicting}
        figures = family_figures(base, tokenizer, finetunes, conflicting, spec)
    return TrainedFamily(tokenizer, base, base_check, finetunes, conflicting, figures)


def train_moe_ready_experts(base_dir: Path, spec: ZooSpec, log: Callable[[str], None]):
    """The saved base's tokenizer and, per skill, its MoE-ready fine-tune and that expert's test-split
    scores: ``(tokenizer, {skill: (model, scores)})``, trained and measured in ``deterministic_torch``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    held_out = held_out_prompts()
    experts = {}
    with deterministic_torch(spec.seed):
        base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        for skill in spec.skills:
            model = finetune(base, tokenizer, spec, skill, held_out, log, moe_ready=True)
            experts[skill] = model, score_skills(model, tokenizer, spec.skills)
    return tokenizer, experts
