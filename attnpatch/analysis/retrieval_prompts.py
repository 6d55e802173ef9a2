"""Synthetic retrieval prompts (passkey, needle in a haystack) fitted to a token length: the data
duo gate training learns from and the retrieval metric scores (evaluation/retrieval.py)."""

from __future__ import annotations

import random
from dataclasses import dataclass

PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about it.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
CITIES = ("Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hobart", "Tromso", "Cusco", "Windhoek", "Bergen")


@dataclass
class RetrievalCase:
    prompt: str
    answer: str
    length: int  # target prompt length in tokens
    depth: float
    kind: str


def _fit(tokenizer, build, length: int) -> str:
    """The largest build(n) (n filler units) whose tokenisation fits in `length` tokens."""
    lo, hi = 0, 1
    while len(tokenizer(build(hi)).input_ids) <= length:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(tokenizer(build(mid)).input_ids) <= length:
            lo = mid
        else:
            hi = mid
    return build(lo)


def passkey_case(tokenizer, length: int, depth: float, rng: random.Random) -> RetrievalCase:
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"

    def build(n):
        before = round(n * depth)
        return f"{PASSKEY_INTRO} {PASSKEY_FILLER * before}{needle}{PASSKEY_FILLER * (n - before)}{question}"

    return RetrievalCase(_fit(tokenizer, build, length), key, length, depth, "passkey")


def needle_case(tokenizer, length: int, depth: float, rng: random.Random, haystack: list[str]) -> RetrievalCase:
    city, number = rng.choice(CITIES), str(rng.randint(1000000, 9999999))
    needle = f" The special magic number for {city} is {number}. "
    question = f"\nWhat is the special magic number for {city}? The special magic number for {city} is"
    offset = rng.randrange(max(1, len(haystack) - 4000))

    def build(n):
        sentences = haystack[offset : offset + n]
        cut = round(len(sentences) * depth)
        return " ".join(sentences[:cut]) + needle + " ".join(sentences[cut:]) + question

    return RetrievalCase(_fit(tokenizer, build, length), number, length, depth, "needle")
