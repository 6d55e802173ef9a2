"""Long-context retrieval: passkey and needle-in-a-haystack over a grid of lengths x depths.

Both build a prompt of a target token length with a fact hidden at a relative depth (0 = start,
1 = just before the question), ask for it, decode greedily and score exact match of the digits.
Everything is seeded, so a grid is the same for every method compared.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

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


def make_cases(tokenizer, kind: str, lengths, depths, samples: int = 1, seed: int = 0,
               haystack_text: str | None = None) -> list[RetrievalCase]:
    rng = random.Random(seed)
    if kind == "needle":
        from .lm_tasks import sentences

        if haystack_text is None:
            from .data import fallback_text

            haystack_text = fallback_text()[0]
        haystack = sentences(haystack_text, min_words=4, max_words=60)
    cases = []
    for length in lengths:
        for depth in depths:
            for _ in range(samples):
                if kind == "passkey":
                    cases.append(passkey_case(tokenizer, length, depth, rng))
                elif kind == "needle":
                    cases.append(needle_case(tokenizer, length, depth, rng, haystack))
                else:
                    raise ValueError(f"unknown retrieval kind {kind!r}; use 'passkey' or 'needle'")
    return cases


@dataclass
class RetrievalResult:
    kind: str
    accuracy: float
    grid: dict = field(default_factory=dict)  # {length: {depth: accuracy}}
    cases: list = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"kind": self.kind, "accuracy": self.accuracy, "seconds": self.seconds,
                "grid": {str(k): {str(d): a for d, a in v.items()} for k, v in self.grid.items()}}


@torch.no_grad()
def evaluate_retrieval(model, tokenizer, cases: list[RetrievalCase], max_new_tokens: int = 10,
                       progress: bool = True) -> RetrievalResult:
    """Greedy answers; a case is right when the first number in the answer equals the hidden one."""
    device = next(model.parameters()).device
    scored = []
    t0 = time.perf_counter()
    for case in tqdm(cases, desc=f"{cases[0].kind if cases else 'retrieval'}", disable=not progress, leave=False):
        inputs = tokenizer(case.prompt, return_tensors="pt").to(device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        answer = tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
        # digit-level tokenizers may decode a number with spaces between its digits
        found = re.search(r"\d+", re.sub(r"(?<=\d)\s+(?=\d)", "", answer))
        scored.append({"length": case.length, "depth": case.depth, "tokens": int(inputs.input_ids.shape[1]),
                       "expected": case.answer, "answer": answer.strip(),
                       "correct": bool(found and found.group() == case.answer)})
    grid: dict = {}
    for row in scored:
        grid.setdefault(row["length"], {}).setdefault(row["depth"], []).append(row["correct"])
    grid = {length: {depth: sum(v) / len(v) for depth, v in sorted(d.items())} for length, d in sorted(grid.items())}
    accuracy = sum(r["correct"] for r in scored) / max(len(scored), 1)
    return RetrievalResult(cases[0].kind if cases else "", accuracy, grid, scored, time.perf_counter() - t0)
