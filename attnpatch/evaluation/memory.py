"""Peak memory of a block of work, and the bytes a KV cache holds."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import torch


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import psutil

        return psutil.Process().memory_info().rss


@contextmanager
def peak_memory():
    """Peak extra memory while the block runs: CUDA allocator peak on GPU, else sampled RSS growth."""
    result = {"bytes": 0}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield result
        result["bytes"] = torch.cuda.max_memory_allocated() - start
        return
    start = _rss_bytes()
    peak = [start]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["bytes"] = max(0, max(peak[0], _rss_bytes()) - start)


