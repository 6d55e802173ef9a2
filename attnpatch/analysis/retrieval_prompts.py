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
    question: str = ""  # the prompt's last part: what a query-agnostic run holds back until after compression

    @property
    def context(self) -> str:
        return self.prompt[: len(self.prompt) - len(self.question)]


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

    return RetrievalCase(_fit(tokenizer, build, length), key, length, depth, "passkey", question)


def needle_case(tokenizer, length: int, depth: float, rng: random.Random, haystack: list[str]) -> RetrievalCase:
    city, number = rng.choice(CITIES), str(rng.randint(1000000, 9999999))
    needle = f" The special magic number for {city} is {number}. "
    question = f"\nWhat is the special magic number for {city}? The special magic number for {city} is"
    offset = rng.randrange(max(1, len(haystack) - 4000))

    def build(n):
        sentences = haystack[offset : offset + n]
        cut = round(len(sentences) * depth)
        return " ".join(sentences[:cut]) + needle + " ".join(sentences[cut:]) + question

    return RetrievalCase(_fit(tokenizer, build, length), number, length, depth, "needle", question)


def multikey_case(tokenizer, length: int, rng: random.Random, haystack: list[str], keys: int = 4) -> RetrievalCase:
    """Several needles (one magic number per city) at spread depths; the question asks for one of them."""
    cities = rng.sample(CITIES, keys)
    numbers = [str(rng.randint(1000000, 9999999)) for _ in cities]
    asked = rng.randrange(keys)
    question = (f"\nWhat is the special magic number for {cities[asked]}? The special magic number for "
                f"{cities[asked]} is")
    offset = rng.randrange(max(1, len(haystack) - 4000))
    depths = sorted(rng.random() for _ in cities)

    def build(n):
        sentences = list(haystack[offset : offset + n])
        for depth, city, number in sorted(zip(depths, cities, numbers), reverse=True):
            sentences.insert(round(len(sentences) * depth), f"The special magic number for {city} is {number}.")
        return " ".join(sentences) + question

    return RetrievalCase(_fit(tokenizer, build, length), numbers[asked], length, depths[asked], "multikey", question)


def variable_tracking_case(tokenizer, length: int, rng: random.Random, hops: int = 3) -> RetrievalCase:
    """A value passed along a chain of variables spread over filler ("VAR B = VAR A."); the question
    asks for the value of the last variable, so every link of the chain must survive."""
    names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops + 1)]
    value = str(rng.randint(10000, 99999))
    links = [f"VAR {names[0]} = {value}. "] + [f"VAR {names[i + 1]} = VAR {names[i]}. " for i in range(hops)]
    question = f"Question: what is the value of VAR {names[-1]}? Answer: VAR {names[-1]} ="

    def build(n):
        units, step = [PASSKEY_FILLER] * n, max(1, n // (hops + 2))
        for i, link in enumerate(links):
            units.insert(min(len(units), (i + 1) * step + i), link)
        return f"{PASSKEY_INTRO} " + "".join(units) + question

    return RetrievalCase(_fit(tokenizer, build, length), value, length, 0.0, "variable_tracking", question)
