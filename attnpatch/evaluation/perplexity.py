"""Perplexity two ways.

- `windowed_perplexity`: the usual strided sliding-window recipe. Windows of `max_length` tokens
  start every `stride` tokens; each window scores only the tokens the previous one did not, so with
  stride < max_length every scored token has at least max_length - stride tokens of context.
  stride == max_length gives independent, non-overlapping windows.
- `decoding_perplexity`: the text is fed one token at a time through the model's KV cache, scoring
  each next token. This is the honest measure for KV-compression and streaming methods: whatever
  the cache evicts or compresses is gone for every later token, which prefill perplexity hides.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..runtime.cache import cache_kwargs, cache_nbytes
from .memory import peak_memory


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    seconds: float
    peak_bytes: int
    windows: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens, "seconds": self.seconds,
                "tokens_per_s": self.tokens_per_second, "peak_mb": self.peak_bytes / 2**20, "windows": self.windows,
                **self.extra}


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def windowed_perplexity(model, input_ids: torch.Tensor, max_length: int = 1024, stride: int | None = None,
                        max_tokens: int | None = None, desc: str = "perplexity", progress: bool = True,
                        warmup: bool = True) -> PerplexityResult:
    """Strided sliding-window perplexity over 1-D token ids (see the module docstring).

    With `warmup`, one unmeasured forward runs first, so one-time costs (first-touch memory, lazy
    initialisation) are not charged to whichever method is measured first."""
    stride = max_length if stride is None else stride
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    ids = input_ids.reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    device = _device(model)
    if warmup:
        model(input_ids=ids[:max_length].to(device)[None], use_cache=False, logits_to_keep=1)
    total_nll, scored, previous_end, windows = 0.0, 0, 0, 0
    begins = list(range(0, max(1, ids.numel() - 1), stride))
    with peak_memory() as mem:
        t0 = time.perf_counter()
        for begin in tqdm(begins, desc=desc, disable=not progress, leave=False):
            end = min(begin + max_length, ids.numel())
            new_tokens = end - max(previous_end, begin + 1)  # tokens not scored by an earlier window
            if new_tokens <= 0:
                break
            chunk = ids[begin:end].to(device)
            logits = model(input_ids=chunk[None], use_cache=False, logits_to_keep=new_tokens + 1).logits[0]
            predicted = logits[-new_tokens - 1 : -1].float()
            nll = torch.nn.functional.cross_entropy(predicted, chunk[-new_tokens:], reduction="sum")
            total_nll += float(nll)
            scored += new_tokens
            previous_end, windows = end, windows + 1
            if end == ids.numel():
                break
        seconds = time.perf_counter() - t0
    mean = total_nll / max(scored, 1)
    return PerplexityResult(math.exp(mean), mean, scored, seconds, mem["bytes"], windows,
                            {"max_length": max_length, "stride": stride})


@torch.no_grad()
def decoding_perplexity(model, input_ids: torch.Tensor, max_tokens: int = 1024, prefill: int = 1,
                        cache_factory=None, desc: str = "decoding perplexity", progress: bool = True,
                        tokenizer=None) -> PerplexityResult:
    """Prefill `prefill` tokens in one forward (a KV method compresses them then), then feed the
    rest one token at a time through the cache, scoring every token after the prefill: tokens
    prefill .. max_tokens-1, each predicted from everything the cache still holds.

    cache_factory(model) -> Cache; default: a DynamicCache for the model's config (a patched model
    swaps in its own layers where its method needs them). A method that compresses only through
    `compress_context` (kvzip: it replays the context; `tokenizer` writes its instruction) prefills
    that way. The result's extra holds the cache's bytes at the end and the tokens it saw."""
    from ..api.contexts import context_replaying_method, prefill_cache

    ids = input_ids.reshape(-1)[:max_tokens].to(_device(model))
    if ids.numel() < 2:
        raise ValueError("decoding perplexity needs at least 2 tokens")
    prefill = max(1, min(prefill, ids.numel() - 1))
    replaying = context_replaying_method(model)
    if replaying is not None and cache_factory is not None:
        raise ValueError(f"{replaying} compresses through compress_context, which makes its own cache: "
                         "pass no cache_factory")
    total_nll, scored = 0.0, 0
    with peak_memory() as mem:
        t0 = time.perf_counter()
        if cache_factory is None:
            cache, logits = prefill_cache(model, ids[None, :prefill], tokenizer)
        else:
            cache = cache_factory(model)
            logits = model(input_ids=ids[None, :prefill], **cache_kwargs(model, cache), use_cache=True,
                           logits_to_keep=1).logits
        total_nll += float(torch.nn.functional.cross_entropy(logits[0, -1:].float(), ids[prefill : prefill + 1]))
        scored += 1
        prefill_seconds = time.perf_counter() - t0
        for t in tqdm(range(prefill, ids.numel() - 1), desc=desc, disable=not progress, leave=False):
            out = model(input_ids=ids[None, t : t + 1], **cache_kwargs(model, cache), use_cache=True)
            total_nll += float(torch.nn.functional.cross_entropy(out.logits[0].float(), ids[t + 1 : t + 2]))
            scored += 1
        seconds = time.perf_counter() - t0
    mean = total_nll / scored
    decode_steps = ids.numel() - 1 - prefill
    return PerplexityResult(math.exp(mean), mean, scored, seconds, mem["bytes"], 1,
                            {"cache_bytes": cache_nbytes(cache), "cache_seq_length": cache.get_seq_length(),
                             "prefill": prefill, "decode_tokens_per_s": decode_steps / max(seconds - prefill_seconds, 1e-9)})
