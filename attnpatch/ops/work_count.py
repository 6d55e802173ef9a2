"""Counting the work sparse kernels do, for tests and benchmarks: the proof that blocks are skipped,
not computed and then masked. Off unless a `count_computed_blocks` block is active."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass


@dataclass
class ComputedWork:
    """What the sparse kernels computed while `count_computed_blocks` was active.

    pairs: (query block, key block) pairs of the block-sparse kernels, per sequence and kv head (one
    query block's query group attending one block of keys). scores: query-key score elements any
    sparse kernel computed (block-sparse, sliding window, a_shape's spans), per sequence and query head,
    masked ones inside computed blocks included: dense attention computes Lq x Lk of them.
    dense_pairs: the block pairs dense attention has on the same block grids (causal: those at or below
    the diagonal), so pairs / dense_pairs is the density the kernels really ran at. calls: kernel calls."""

    pairs: int = 0
    dense_pairs: int = 0
    scores: int = 0
    calls: int = 0


_computed: contextvars.ContextVar = contextvars.ContextVar("attnpatch_computed_work", default=None)


@contextlib.contextmanager
def count_computed_blocks():
    """Count the work the sparse kernels (torch and FlexAttention) do while the block runs. Counting is
    off otherwise (on a GPU it costs a host read per call)."""
    counter = ComputedWork()
    token = _computed.set(counter)
    try:
        yield counter
    finally:
        _computed.reset(token)


def counting() -> bool:
    return _computed.get() is not None


def record_work(pairs=0, scores=0, dense_pairs=0, calls: int = 1) -> None:
    """Add to the active count (kernels call this; nothing happens when nobody counts)."""
    counter = _computed.get()
    if counter is not None:
        counter.pairs += int(pairs)
        counter.dense_pairs += int(dense_pairs)
        counter.scores += int(scores)
        counter.calls += calls


def dense_block_pairs(first: int, query_blocks: int, key_blocks: int, causal: bool) -> int:
    """Block pairs of dense attention on a grid whose query block r is absolute block first + r."""
    if not causal:
        return query_blocks * key_blocks
    return sum(min(first + r + 1, key_blocks) for r in range(query_blocks))
