"""The demo family's skills and their items: what the training data, the task splits and the held-out
prompts are made of.

Pure Python and seeded ``random`` only, so the items are the same on every machine; the build's cache key
covers this module because every model is trained on what it generates (see ``search.demo.spec``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

TASK_SEED = 1234
SEARCH_SIZE = 60
TEST_SIZE = 100
WORD_LENGTH = 3


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


def mc_choices(item: Item) -> list[str]:
    """The multiple-choice options of an item, correct one first: both the scorer and the task files list
    them, so they live beside the items they are made of."""
    word = item.sloppy
    return [item.answer, word, word[1] + word[0] + word[2:], word[1:] + word[0]]
