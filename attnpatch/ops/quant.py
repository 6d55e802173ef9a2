"""Asymmetric min-max quantisation of KV entries, packed into bytes (pure tensor math).

Keys are quantised per channel over groups of `group` tokens (outlier channels keep their own
range), values per token over groups of `group` channels; codes of `bits` in {2, 4, 8} bits are
packed 8 // bits to a byte, scales and minima kept in float16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float16


@dataclass
class Quantized:
    codes: torch.Tensor  # uint8, packed along the last dim
    scale: torch.Tensor
    minimum: torch.Tensor
    bits: int
    axis: str  # "tokens" (keys: stats over a token group) or "channels" (values)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.minimum))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., N) integer codes < 2**bits -> (..., N * bits / 8) uint8."""
    per_byte = 8 // bits
    codes = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.uint8) * bits
    return (codes << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)


def quantize(x: torch.Tensor, bits: int, group: int, axis: str) -> Quantized:
    """x (B, H, T, D). axis="tokens": stats per channel over each group of `group` tokens (T must be
    a multiple of group); axis="channels": stats per token over each group of `group` channels."""
    b, h, t, d = x.shape
    levels = (1 << bits) - 1
    if axis == "tokens":
        grouped = x.float().reshape(b, h, t // group, group, d)
        lo, hi = grouped.amin(dim=3, keepdim=True), grouped.amax(dim=3, keepdim=True)
    else:
        grouped = x.float().reshape(b, h, t, d // group, group)
        lo, hi = grouped.amin(dim=4, keepdim=True), grouped.amax(dim=4, keepdim=True)
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    lo16, scale16 = lo.to(SCALE_DTYPE), scale.to(SCALE_DTYPE)
    # codes from the stored (float16) scale and minimum, so dequantisation reproduces them exactly
    codes = torch.round((grouped - lo16.float()) / scale16.float()).clamp(0, levels)
    return Quantized(pack(codes.reshape(b, h, t, d), bits), scale16, lo16, bits, axis)


def dequantize(q: Quantized, dtype=torch.float32) -> torch.Tensor:
    codes = unpack(q.codes, q.bits).float()
    b, h, t, d = codes.shape
    if q.axis == "tokens":
        grouped = codes.reshape(b, h, q.scale.shape[2], -1, d)
    else:
        grouped = codes.reshape(b, h, t, q.scale.shape[3], -1)
    return (grouped * q.scale.float() + q.minimum.float()).reshape(b, h, t, d).to(dtype)


def concat(parts: list[Quantized]) -> Quantized:
    """Join quantised blocks along the token axis."""
    first = parts[0]
    return Quantized(torch.cat([p.codes for p in parts], dim=2), torch.cat([p.scale for p in parts], dim=2),
                     torch.cat([p.minimum for p in parts], dim=2), first.bits, first.axis)
