"""Attention transfer (stage 1 of a conversion): inside `attention_transfer()`, every patched
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

from .call import run_rows_without_padding
from .exact import exact_attention, exact_attention_weights

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


def attention_cross_entropy(teacher: torch.Tensor, student: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """-sum_j teacher_ij log student_ij, averaged over every query row (rows of teacher that are all
    zero, e.g. padding queries, contribute 0)."""
    log_student = torch.log(torch.nan_to_num(student.float(), nan=0.0).clamp_min(eps))
    return -(teacher.float() * log_student).sum(-1).mean()


def run_method(method, call) -> torch.Tensor:
    """What adapters call: the method's attention, or the teacher/student pair under transfer,
    seen by the active observer if any."""
    method.calls += 1
    out = _run_method(method, call)
    observer = _observer.get()
    return out if observer is None else observer(call, out)


def _attend(method, call) -> torch.Tensor:
    """The method's attention; left-padded rows run on their real tokens where the method's
    pattern is laid out from the first key (Method.needs_unpadded_rows)."""
    if method.needs_unpadded_rows(call):
        pads = call.leading_padding()
        if pads is not None and bool(pads.any()):
            return run_rows_without_padding(method.attention, call, pads)
    return method.attention(call)


def _run_method(method, call) -> torch.Tensor:
    if _exact.get():
        return exact_attention(call)
    transfer = _transfer.get()
    if transfer is None or not method.is_trainable:
        return _attend(method, call)
    losses, attention_ce = transfer
    with torch.no_grad():
        teacher = exact_attention(call)
    own = method.transfer_loss(call)
    if own is not None:
        losses.append(own)
        return teacher
    student = _attend(method, call)
    loss = torch.nn.functional.mse_loss(student.float(), teacher.float())
    if attention_ce > 0:
        with torch.no_grad():
            teacher_weights = exact_attention_weights(call)
        loss = loss + attention_ce * attention_cross_entropy(teacher_weights, method.attention_weights(call))
    losses.append(loss)
    return teacher
