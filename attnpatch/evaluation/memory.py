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


def _release_freed_memory() -> None:
    """Give memory the C allocator holds after frees back to the system (glibc malloc_trim), so the
    resident set before a block is what is live, not what earlier work left cached."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux clear_refs 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


@contextmanager
def peak_memory():
    """Peak extra memory while the block runs: CUDA allocator peak on GPU; else resident-set growth,
    exact from the kernel's high-water mark on Linux (reset first), sampled every 5 ms elsewhere.
    Memory freed earlier is handed back first (malloc_trim), so the start counts live data only."""
    result = {"bytes": 0}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield result
        result["bytes"] = torch.cuda.max_memory_allocated() - start
        return
    _release_freed_memory()
    start = _rss_bytes()
    if _reset_peak_rss() and _peak_rss_bytes() is not None:
        try:
            yield result
        finally:
            result["bytes"] = max(0, _peak_rss_bytes() - start)
        return
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


