"""Learning which kv heads retrieve (DuoAttention): with the model frozen, every kv head gets a gate
alpha in [0, 1] mixing full attention (alpha) and sinks + window attention (1 - alpha); the gates
minimise the distance between the final hidden states of the mixed model and of the full model on
the last tokens of long synthetic passkey prompts (where retrieval matters), plus an L1 penalty
that pushes gates towards streaming. Thresholding the gates (or keeping the top fraction) gives
the retrieval heads `duo_heads` runs with.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..config import PatchConfig
from ..errors import PatchError


@dataclass
class DuoCalibration:
    """gates[tower][layer, kv head]: the learnt mixing weights; history: (step, distillation, L1)."""

    gates: torch.Tensor  # (layers, kv heads)
    tower: str
    sinks: int
    window: int
    history: list[tuple[int, float, float]]

    def config(self, retrieval_ratio: float | None = None, threshold: float | None = None) -> PatchConfig:
        """duo_heads config: the top `retrieval_ratio` of kv heads by gate (ties broken by order),
        or every head whose gate exceeds `threshold`, keep full attention."""
        if (retrieval_ratio is None) == (threshold is None):
            raise PatchError("give exactly one of retrieval_ratio (fraction of kv heads kept full) or threshold")
        flat = self.gates.flatten()
        if retrieval_ratio is not None:
            if not 0.0 <= retrieval_ratio <= 1.0:
                raise PatchError(f"retrieval_ratio is a fraction of kv heads, in [0, 1]; got {retrieval_ratio}")
            count = round(retrieval_ratio * flat.numel())
            chosen = torch.zeros_like(flat, dtype=torch.bool)
            chosen[torch.argsort(flat, descending=True, stable=True)[:count]] = True
        else:
            chosen = flat > threshold
        chosen = chosen.view_as(self.gates)
        layer_params = {layer: {"retrieval_heads": row.nonzero().flatten().tolist()}
                        for layer, row in enumerate(chosen) if bool(row.any())}
        return PatchConfig("duo_heads", params={"sinks": self.sinks, "window": self.window},
                           layer_params=layer_params, towers=[self.tower]).validated()

    def retrieval_fraction(self, config: PatchConfig) -> float:
        return sum(len(p["retrieval_heads"]) for p in config.layer_params.values()) / self.gates.numel()

    def table(self, digits: int = 3) -> str:
        header = "| layer | " + " | ".join(f"kv{h}" for h in range(self.gates.shape[1])) + " |"
        rows = [header, "|" + "---|" * (self.gates.shape[1] + 1)]
        rows += [f"| {i} | " + " | ".join(f"{v:.{digits}f}" for v in row) + " |" for i, row in enumerate(self.gates.tolist())]
        return "\n".join(rows)


def passkey_batches(tokenizer, count: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    """Synthetic passkey prompts of about `length` tokens with the answer appended, needles at
    random depths (the training data DuoAttention uses)."""
    from .retrieval_prompts import passkey_case

    rng = random.Random(seed)
    batches = []
    for _ in range(count):
        case = passkey_case(tokenizer, length - 8, rng.random(), rng)
        batches.append(tokenizer(case.prompt + " " + case.answer, return_tensors="pt").input_ids)
    return batches


def train_duo_heads(model, batches, sinks: int = 16, window: int = 256, steps: int = 100, lr: float = 0.02,
                    l1: float = 0.05, supervise: int = 32, progress: bool = True) -> DuoCalibration:
    """Optimise per-kv-head gates with the model frozen (see the module docstring). `batches`:
    input_ids tensors (e.g. `passkey_batches`); the loss compares the last `supervise` positions'
    final hidden states. Gates start at 1 (full attention) and are clamped to [0, 1]."""
    from ..api import is_patched, patch_model, patched_methods, unpatch_model

    if is_patched(model):
        raise PatchError("train_duo_heads needs an unpatched model (it patches duo_heads while training)")
    if not isinstance(steps, int) or steps < 1:
        raise PatchError(f"steps must be a positive integer, got {steps!r}")
    batches = [b if b.dim() == 2 else b[None] for b in batches]
    if not batches:
        raise PatchError("batches is empty; give at least one input_ids tensor")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    teachers = []
    with torch.no_grad():
        for ids in batches:
            hidden = model(input_ids=ids.to(device), output_hidden_states=True, use_cache=False).hidden_states[-1]
            teachers.append(hidden[:, -supervise:].float())
    patch_model(model, "duo_heads", sinks=sinks, window=window)
    methods = patched_methods(model)
    tower = methods[0].site.tower
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    gates = torch.ones(len(methods), methods[0].site.num_kv_heads, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([gates], lr=lr)
    history = []
    try:
        for step in tqdm(range(steps), desc="duo_heads gates", disable=not progress):
            index = step % len(batches)
            # fresh views of the gates each step: the last step's graph was freed by backward
            for i, method in enumerate(methods):
                method.gate = gates[i]
            hidden = model(input_ids=batches[index].to(device), output_hidden_states=True, use_cache=False)
            student = hidden.hidden_states[-1][:, -supervise:].float()
            distill = torch.nn.functional.mse_loss(student, teachers[index])
            penalty = gates.clamp(0, 1).abs().mean()
            loss = distill + l1 * penalty
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                gates.clamp_(0, 1)
            history.append((step, float(distill.detach()), float(penalty.detach())))
    finally:
        for method in methods:
            method.gate = None
        unpatch_model(model)
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    return DuoCalibration(gates.detach().cpu(), tower, sinks, window, history)
