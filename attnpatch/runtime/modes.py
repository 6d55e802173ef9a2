"""The modes attention runs in, set by context managers and read by the dispatcher (routing/) and by
methods whose student is not an attention function:

Attention transfer (stage 1 of a conversion): inside `attention_transfer()`, every patched
attention module computes both its method's output (the student) and exact softmax attention
(the teacher), records MSE(student, teacher) and passes the *teacher* output on. Each layer thus
learns from the inputs the original model would give it, and only the student's own parameters
(feature maps, gates) receive gradients, so memory stays bounded layer by layer.

With `attention_ce > 0` each layer's loss also gets Hedgehog's soft cross-entropy between the
softmax weights and the student's weights, -sum_j a_ij log(a'_ij), averaged over queries and heads
(materialises (Lq x Lk) weights per layer: fine at training lengths)."""

from __future__ import annotations

import contextlib
import contextvars

import torch

_transfer: contextvars.ContextVar = contextvars.ContextVar("attnpatch_attention_transfer", default=None)
_observer: contextvars.ContextVar = contextvars.ContextVar("attnpatch_attention_observer", default=None)
_exact: contextvars.ContextVar = contextvars.ContextVar("attnpatch_exact_attention", default=False)


@contextlib.contextmanager
def exact_attention_everywhere():
    """While the block runs, every patched module computes exact softmax attention instead of its
    method (the base model's attention, whatever else the patch added, e.g. its parameters, stays)."""
    token = _exact.set(True)
    try:
        yield
    finally:
        _exact.reset(token)


@contextlib.contextmanager
def observe_attention(observer):
    """While the block runs, every patched module's attention output (B, Hq, Lq, D) is passed
    through `observer(call, output) -> output` (head importance gates and statistics use this)."""
    token = _observer.set(observer)
    try:
        yield
    finally:
        _observer.reset(token)


@contextlib.contextmanager
def attention_transfer(attention_ce: float = 0.0):
    """Collect per-layer losses (a list of scalar tensors: MSE + attention_ce * cross-entropy)
    while the block runs."""
    if not attention_ce >= 0.0:
        raise ValueError(f"attention_ce must be >= 0 (the weight of the attention cross-entropy), got {attention_ce}")
    losses: list[torch.Tensor] = []
    token = _transfer.set((losses, attention_ce))
    try:
        yield losses
    finally:
        _transfer.reset(token)


def active_transfer() -> tuple[list, float] | None:
    """(losses, attention_ce) while `attention_transfer` runs, else None: for methods whose student
    is not an attention function (structural ones compare whole attention modules instead)."""
    return _transfer.get()


def current_observer():
    """The observer set by `observe_attention`, or None."""
    return _observer.get()


def exact_everywhere() -> bool:
    """True inside `exact_attention_everywhere`."""
    return _exact.get()
