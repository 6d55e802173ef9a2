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

from ..analysis.retrieval_prompts import RetrievalCase, needle_case, passkey_case


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
                       progress: bool = True, query_agnostic: bool = False) -> RetrievalResult:
    """Greedy answers; a case is right when the first number in the answer equals the hidden one.
    query_agnostic: the model's KV method compresses the context before the question is seen
    (`compress_context`), as in multi-question use; methods that replay the context (kvzip) always
    run so. Otherwise the whole prompt, question included, is prefilled at once."""
    from ..api.contexts import compress_context, context_replaying_method
    from ..api.patching import patched_configs

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id or tokenizer.eos_token_id
    method = context_replaying_method(model)
    if method is None and query_agnostic:
        configs = patched_configs(model)
        if len(configs) != 1:
            raise ValueError("query_agnostic retrieval needs a model patched with one KV compression method, "
                             f"got {[c.method for c in configs] or 'an unpatched model'}")
        method = configs[0].method
    scored = []
    t0 = time.perf_counter()
    for case in tqdm(cases, desc=f"{cases[0].kind if cases else 'retrieval'}", disable=not progress, leave=False):
        inputs = tokenizer(case.prompt, return_tensors="pt").to(device)
        if method is None:
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            new_tokens = out[0, inputs.input_ids.shape[1]:]
        else:
            if not case.question:
                raise ValueError(f"a query-agnostic {case.kind} case needs its question (RetrievalCase.question)")
            context = tokenizer(case.context, return_tensors="pt").input_ids
            question = tokenizer(case.question, add_special_tokens=False, return_tensors="pt").input_ids
            with compress_context(model, context, method, tokenizer=tokenizer) as ctx:
                new_tokens = ctx.generate(question, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)[0]
        answer = tokenizer.decode(new_tokens, skip_special_tokens=True)
        # digit-level tokenizers may decode a number with spaces between its digits
        found = re.search(r"\d+", re.sub(r"(?<=\d)\s+(?=\d)", "", answer))
        scored.append({"length": case.length, "depth": case.depth, "tokens": int(inputs.input_ids.shape[1]),
                       "expected": case.answer, "answer": answer.strip(),
                       "correct": bool(found and found.group() == case.answer), "query_agnostic": method is not None})
    grid: dict = {}
    for row in scored:
        grid.setdefault(row["length"], {}).setdefault(row["depth"], []).append(row["correct"])
    grid = {length: {depth: sum(v) / len(v) for depth, v in sorted(d.items())} for length, d in sorted(grid.items())}
    accuracy = sum(r["correct"] for r in scored) / max(len(scored), 1)
    return RetrievalResult(cases[0].kind if cases else "", accuracy, grid, scored, time.perf_counter() - t0)
