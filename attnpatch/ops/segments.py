"""How much one segment of a chunked kernel may hold: long inputs run in segments so memory stays bounded
at any length. `DEVICE_SEGMENT_BYTES` is the knob a user lowers on a small GPU."""

from __future__ import annotations

import torch

# What one segment of a chunked kernel may hold in intermediates: long inputs run in segments so memory
# stays bounded at any length, and segments this large keep the per-segment overhead negligible.
SEGMENT_BYTES = 64 * 2**20
# Kernels whose every segment allocates several fresh intermediates of the segment's size (the chunked
# linear and window + linear forms) are faster with small segments: buffers of a few MiB are recycled by
# the allocator and stay in cache, while tens of MiB come back as fresh pages on every segment. Measured
# per layer at 16k tokens, 2 threads: linear 107 -> 56 ms, window + linear 281 -> 180 ms (sliding-window
# SDPA, which allocates little per segment, gains nothing and keeps SEGMENT_BYTES).
RECYCLED_SEGMENT_BYTES = 4 * 2**20
# On an accelerator each kernel is launched from the host (~10-20 us), so segments sized for CPU caches
# leave a long prefill host-bound (block_topk's scoring was 5,130 launches per forward at 32k on an
# H200, 1.05 s of host time for 0.18 s of GPU work); there, memory is what bounds a segment.
DEVICE_SEGMENT_BYTES = 256 * 2**20


def segment_bytes(device: torch.device, cpu_bytes: int) -> int:
    """What one segment of a chunked kernel may hold on `device`: `cpu_bytes` on the CPU, else
    DEVICE_SEGMENT_BYTES (read at call time, so a benchmark can sweep it)."""
    return cpu_bytes if torch.device(device).type == "cpu" else max(cpu_bytes, DEVICE_SEGMENT_BYTES)
