"""Attention transfer (stage 1 of a conversion): inside `attention_transfer()`, every patched
attention module computes both its method's output (the student) and exact softmax attention
(the teacher), records MSE(student, teacher) and passes the *teacher* output on. Each layer thus
learns from the inputs the original model would give it, and only the student's own parameters
(feature maps, gates) receive gradients, so memory stays bounded layer by layer."""

from __future__ import annotations

import contextlib
import contextvars

import torch

_losses: contextvars.ContextVar = contextvars.ContextVar("attnpatch_attention_transfer", default=None)


@contextlib.contextmanager
def attention_transfer():
    """Collect per-layer MSE losses (a list of scalar tensors) while the block runs."""
    losses: list[torch.Tensor] = []
    token = _losses.set(losses)
    try:
        yield losses
    finally:
        _losses.reset(token)


def run_method(method, call) -> torch.Tensor:
    """What adapters call: the method's attention, or the teacher/student pair under transfer."""
    losses = _losses.get()
    if losses is None or not method.is_trainable:
        return method.attention(call)
    from .methods.reference import exact_attention

    with torch.no_grad():
        teacher = exact_attention(call)
    student = method.attention(call)
    losses.append(torch.nn.functional.mse_loss(student.float(), teacher.float()))
    return teacher
