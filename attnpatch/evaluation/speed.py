"""Speed and memory: prefill latency across lengths, decode tokens/s, peak memory, KV-cache bytes.

Timings take the best of `repeats` runs after a warm-up. KV bytes are read from the cache object
itself (stored keys/values plus any recurrent state), not estimated from shapes.
"""

from __future__ import annotations

import time

import torch

from ..runtime.cache import cache_kwargs, cache_nbytes
from .memory import peak_memory


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn, repeats: int, device=None) -> float:
    """The fastest of `repeats` timed calls of fn() (GPU work synchronised before and after)."""
    device = torch.device("cpu") if device is None else device
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _random_ids(model, length: int, seed: int) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, max(11, vocab - 1), (1, length), generator=g)


@torch.no_grad()
def prefill_latency(model, lengths, repeats: int = 2, seed: int = 0) -> list[dict]:
    """Seconds for one forward over `length` random tokens (no cache, last logits only)."""
    device = next(model.parameters()).device
    rows = []
    model(input_ids=_random_ids(model, min(lengths), seed).to(device), use_cache=False, logits_to_keep=1)  # warm-up
    for length in lengths:
        ids = _random_ids(model, length, seed + length).to(device)
        with peak_memory() as mem:
            best = best_seconds(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), repeats, device)
        rows.append({"tokens": length, "seconds": best, "tokens_per_s": length / best, "peak_mb": mem["bytes"] / 2**20})
    return rows


@torch.no_grad()
def decode_speed(model, prompt_tokens: int = 256, new_tokens: int = 64, seed: int = 0) -> dict:
    """Greedy decoding after a random prompt: decode tokens/s (prefill excluded), KV bytes, peak memory."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = _random_ids(model, prompt_tokens, seed).to(device)
    cache = DynamicCache(config=model.config)
    with peak_memory() as mem:
        out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, **cache_kwargs(model, cache), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        seconds = time.perf_counter() - t0
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "decode_tokens_per_s": new_tokens / seconds,
            "kv_bytes": cache_nbytes(cache), "peak_mb": mem["bytes"] / 2**20}


def style_speedup_axes(ax, xlabel: str, title: str) -> None:
    """The look shared by speed-up plots: log tokens axis, the dense baseline at 1, grid, legend."""
    ax.axhline(1.0, color="gray", ls=":")
    ax.set(xscale="log", xlabel=xlabel, ylabel="speedup vs dense SDPA (same run)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
