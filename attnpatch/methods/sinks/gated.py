"""`gated`: gated attention (Qiu et al., 2025), a head-specific sigmoid gate on each head's
attention output before the output projection, computed from the attention block's input X:
O_h * 2 sigmoid(X W_h + b_h). The factor 2 with W = b = 0 makes the initial gate exactly 1, so a
freshly patched model equals the unpatched one (up to the attention kernel's rounding); training (the recipes' stage 2 with
`train_attnpatch: true`, LoRA or gate-only) moves the gates, which lets heads switch off instead of
dumping attention on sink tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import PatchError
from ...runtime.exact import exact_attention
from ..base import Method, Paper, ParamSpec

INPUT_ATTR = "_attnpatch_gate_input"


def _capture_input(module, args, kwargs):
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    module.__dict__[INPUT_ATTR] = hidden


def _release_input(module, args, kwargs, output):
    module.__dict__.pop(INPUT_ATTR, None)


class GatedAttention(Method):
    name = "gated"
    paper = Paper('Gated Attention for Large Language Models: Non-linearity, Sparsity, and Attention-Sink-Free', 2025, "https://arxiv.org/abs/2505.06708")
    deviations = ()
    family = "sink-recalibrated"
    summary = ("Gated attention: each head's output is scaled by 2 sigmoid(X W + b), X the attention block's input "
               "(per head, or per channel with elementwise=True); starts as the identity, trained with the recipes.")
    model_kinds = ("decoder", "encoder")
    interventions = frozenset({"attention", "parameters"})
    params = (ParamSpec("elementwise", bool, False, "one gate per head channel instead of one per head"),)
    trainable = True
    trainable_note = "the gate projection (attnpatch_gate, zero-initialised: the gate starts at exactly 1)"

    def attach(self, module) -> None:
        reference = next(module.parameters())
        hidden = reference.shape[-1] if reference.dim() == 2 else None
        projection = getattr(module, self.site.heads.projections[0], None) if self.site.heads else None
        if isinstance(projection, nn.Linear):
            hidden = projection.in_features
        if hidden is None:
            raise PatchError(f"gated needs the input width of {self.site.path}; it has no q projection to read it from")
        width = self.site.num_heads * (self.site.head_dim if self.config["elementwise"] else 1)
        gate = nn.Linear(hidden, width, device=reference.device, dtype=reference.dtype)
        nn.init.zeros_(gate.weight)
        nn.init.zeros_(gate.bias)
        module.attnpatch_gate = gate
        self._hooks = [module.register_forward_pre_hook(_capture_input, with_kwargs=True),
                       module.register_forward_hook(_release_input, with_kwargs=True, always_call=True)]

    def detach(self, module) -> None:
        for hook in getattr(self, "_hooks", []):
            hook.remove()
        module.__dict__.pop(INPUT_ATTR, None)
        super().detach(module)

    def attention(self, call):
        out = exact_attention(call)  # (B, Hq, Lq, D)
        hidden = call.module.__dict__.get(INPUT_ATTR)
        if hidden is None or hidden.shape[-2] != out.shape[-2]:
            raise PatchError(f"gated could not see the input of {self.site.path} for this call")
        gate = 2 * torch.sigmoid(call.module.attnpatch_gate(hidden))  # (B, Lq, Hq or Hq * D)
        gate = gate.unflatten(-1, (self.site.num_heads, -1)).transpose(1, 2)  # (B, Hq, Lq, 1 or D)
        return out * gate.to(out.dtype)
