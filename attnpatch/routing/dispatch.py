"""The dispatcher adapters call with a normalised call: the method's attention, or, in the modes
runtime/modes.py sets, exact attention, the teacher/student pair of attention transfer, or an
observed output."""

from __future__ import annotations

import torch

from ..runtime.call import run_rows_without_padding
from ..runtime.exact import exact_attention, exact_attention_weights
from ..runtime.modes import active_transfer, current_observer, exact_everywhere


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
    observer = current_observer()
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
    if exact_everywhere():
        return exact_attention(call)
    transfer = active_transfer()
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
