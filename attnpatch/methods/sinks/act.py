"""`act`: attention calibration (ACT, Yu et al. 2024). In the chosen heads, keys other than the
first that receive more than alpha times the uniform share of attention are sinks; their attention
is scaled by beta and the removed mass goes to the other keys of each row (ops/sink_calibration.py).
Training-free; which heads to calibrate is chosen on a small calibration set by `calibrate_act`
(attnpatch/act_calibration.py) and saved per layer as `heads` in layer_params.

Sinks are found from the queries of each call: the whole prompt in a prefill, the new token alone
while decoding (its row against the uniform 1 / keys).
"""

from __future__ import annotations

import dataclasses

import torch

from ...errors import PatchError
from ...ops.sink_recalibration import sink_calibrated_attention
from ...runtime.exact import exact_attention, visible_keys
from ..base import Method, Paper, ParamSpec


def _head_subset(call, heads: list[int]):
    """The call restricted to some query heads, each with its own kv head (no grouping left)."""
    kv = [h // call.kv_groups for h in heads]
    mask = call.mask
    if mask is not None and mask.shape[1] == call.query.shape[1]:
        mask = mask[:, heads]
    return dataclasses.replace(call, query=call.query[:, heads], key=call.key[:, kv], value=call.value[:, kv],
                               mask=mask)


class AttentionCalibration(Method):
    name = "act"
    paper = Paper('Unveiling and Harnessing Hidden Attention Sinks: Training-Free Attention Calibration for Enhancing Large Language Models', 2024, "https://arxiv.org/abs/2406.15765")
    deviations = ()
    family = "sink-recalibrated"
    summary = ("ACT: in the chosen heads, attention on non-initial sink tokens (mean received attention above alpha x "
               "uniform) is scaled by beta and the removed mass spread over the other tokens; training-free, heads "
               "chosen by calibrate_act.")
    model_kinds = ("decoder", "encoder")
    params = (
        ParamSpec("beta", float, 0.4, "factor on the attention sinks receive (1 = unchanged)", low=0.0, high=1.0),
        ParamSpec("alpha", float, 5.0, "a token is a sink when its mean received attention exceeds alpha x the "
                  "uniform share 1/keys", low=0.0, low_open=True),
        ParamSpec("heads", list, None, "query heads of this layer to calibrate (per layer via layer_params, e.g. from "
                  "calibrate_act); unset = every head", low=0, optional=True),
        ParamSpec("block_size", int, 256, "queries whose weights are formed together", low=1, high=65536),
    )

    def __init__(self, site, **params):
        super().__init__(site, **params)
        self.strength = None  # (Hq,) mixing weights while calibrate_act measures each head's effect

    def check_site(self, site) -> None:
        chosen = self.config["heads"]
        bad = sorted(h for h in (chosen or []) if h >= site.num_heads)
        if bad:
            raise PatchError(f"act heads {bad} are out of range for {site.label}, which has {site.num_heads} query "
                             f"heads (valid: 0..{site.num_heads - 1})")
        self.heads = list(range(site.num_heads)) if chosen is None else sorted(set(chosen))

    def _calibrated(self, call) -> torch.Tensor:
        c = self.config
        return sink_calibrated_attention(call.query, call.key, call.value, visible_keys(call), call.scaling,
                                         c["beta"], c["alpha"], call.softcap, call.key_valid(), c["block_size"])

    def attention(self, call):
        if self.strength is not None:  # calibrate_act: every head mixes exact and calibrated attention
            exact = exact_attention(call)
            mix = self.strength.to(exact.dtype)[None, :, None, None]
            return exact + mix * (self._calibrated(call) - exact)
        heads = self.heads
        if len(heads) == call.query.shape[1]:
            return self._calibrated(call)
        chosen = set(heads)
        rest = [h for h in range(call.query.shape[1]) if h not in chosen]  # never empty: heads is a strict subset
        out = torch.empty_like(call.query)
        out[:, rest] = exact_attention(_head_subset(call, rest))
        out[:, heads] = self._calibrated(_head_subset(call, heads))
        return out
