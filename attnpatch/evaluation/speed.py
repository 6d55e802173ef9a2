"""Speed and memory: prefill latency across lengths, decode tokens/s, peak memory, KV-cache bytes.

Timings take the best of `repeats` runs after a warm-up. KV bytes are read from the cache object
itself (stored keys/values plus any recurrent state), not estimated from shapes.
"""

from __future__ import annotations

import statistics
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


def random_ids(model, length: int, seed: int) -> torch.Tensor:
    """(1, length) seeded random token ids of the model's vocabulary (special tokens avoided)."""
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, max(11, vocab - 1), (1, length), generator=g)


@torch.no_grad()
def prefill_latency(model, lengths, repeats: int = 2, seed: int = 0) -> list[dict]:
    """Seconds for one forward over `length` random tokens (no cache, last logits only)."""
    device = next(model.parameters()).device
    rows = []
    model(input_ids=random_ids(model, min(lengths), seed).to(device), use_cache=False, logits_to_keep=1)  # warm-up
    for length in lengths:
        ids = random_ids(model, length, seed + length).to(device)
        with peak_memory() as mem:
            best = best_seconds(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), repeats, device)
        rows.append({"tokens": length, "seconds": best, "tokens_per_s": length / best, "peak_mb": mem["bytes"] / 2**20})
    return rows


@torch.no_grad()
def decode_speed(model, prompt_tokens: int = 256, new_tokens: int = 64, seed: int = 0) -> dict:
    """Greedy decoding after a random prompt: decode tokens/s (prefill excluded), KV bytes, peak memory."""
    from ..api.contexts import prefill_cache

    device = next(model.parameters()).device
    ids = random_ids(model, prompt_tokens, seed).to(device)
    with peak_memory() as mem:
        cache, logits = prefill_cache(model, ids)
        token = logits.argmax(-1)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, **cache_kwargs(model, cache), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        seconds = time.perf_counter() - t0
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "decode_tokens_per_s": new_tokens / seconds,
            "kv_bytes": cache_nbytes(cache), "peak_mb": mem["bytes"] / 2**20}


@torch.no_grad()
def floor_speed(model, lengths, decode_prompt: int = 256, new_tokens: int = 64, repeats: int = 2,
                seed: int = 0) -> dict:
    """The attention-free floor of an unpatched model (`floor.attention_free`): prefill latency per
    length and decode tokens/s, as `prefill_latency` and `decode_speed` measure them."""
    from .floor import attention_free, floor_step

    device = next(model.parameters()).device
    with attention_free(model):
        prefill = prefill_latency(model, lengths, repeats, seed)
        token = random_ids(model, 1, seed).to(device)
        with peak_memory() as mem:
            _sync(device)
            t0 = time.perf_counter()
            for step in range(new_tokens):
                token = floor_step(model, token, decode_prompt + step).argmax(-1)
            _sync(device)
            seconds = time.perf_counter() - t0
    decode = {"prompt_tokens": decode_prompt, "new_tokens": new_tokens, "decode_tokens_per_s": new_tokens / seconds,
              "kv_bytes": 0, "peak_mb": mem["bytes"] / 2**20}
    return {"prefill": prefill, "decode": decode}


@torch.no_grad()
def decode_speed_side_by_side(contenders: dict[str, torch.nn.Module], prompt_tokens: int, new_tokens: int = 64,
                              seed: int = 0, floor: str | None = None) -> dict[str, dict]:
    """Decode speed of several models (dense, patched copies, the floor) in one interleaved run: each
    prefills the same random prompt, then their greedy steps alternate, one step each in turn, so
    the machine's noise falls on all of them alike (the order rotates every step). tokens/s = 1 / the median step time. The
    contender named `floor` runs with attention that costs nothing and no cache (`attention_free`).
    Returns {name: {prompt_tokens, new_tokens, decode_tokens_per_s, step_ms, kv_bytes}}."""
    from ..api.contexts import prefill_cache
    from .floor import attention_free, floor_step

    ids = random_ids(next(iter(contenders.values())), prompt_tokens, seed)
    state = {}
    for name, model in contenders.items():
        device = next(model.parameters()).device
        if name == floor:
            with attention_free(model):
                logits = floor_step(model, ids[:, -1:].to(device), prompt_tokens - 1)
            state[name] = {"cache": None, "token": logits.argmax(-1), "steps": []}
            continue
        cache, logits = prefill_cache(model, ids.to(device))
        state[name] = {"cache": cache, "token": logits.argmax(-1), "steps": []}
    names = list(contenders)
    for step in range(new_tokens):
        for name in names[step % len(names):] + names[:step % len(names)]:  # rotated: no one always goes first
            model, mine = contenders[name], state[name]
            device = mine["token"].device
            if name == floor:
                with attention_free(model):
                    _sync(device)
                    t0 = time.perf_counter()
                    logits = floor_step(model, mine["token"], prompt_tokens + step)
                    _sync(device)
            else:
                _sync(device)
                t0 = time.perf_counter()
                logits = model(input_ids=mine["token"], **cache_kwargs(model, mine["cache"]), use_cache=True).logits
                _sync(device)
            mine["steps"].append(time.perf_counter() - t0)
            mine["token"] = logits[:, -1:].argmax(-1)
    rows = {}
    for name, mine in state.items():
        median = statistics.median(mine["steps"])
        rows[name] = {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "decode_tokens_per_s": 1.0 / median,
                      "step_ms": median * 1e3, "kv_bytes": 0 if mine["cache"] is None else cache_nbytes(mine["cache"])}
    return rows


def style_speedup_axes(ax, xlabel: str, title: str) -> None:
    """The look shared by speed-up plots: log tokens axis, the dense baseline at 1, grid, legend."""
    ax.axhline(1.0, color="gray", ls=":")
    ax.set(xscale="log", xlabel=xlabel, ylabel="speedup vs dense SDPA (same run)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
