"""Quick before/after measurements: perplexity, tokens/s and peak memory, dense vs patched.

The full harness (lm-eval tasks, retrieval, vision, reports) lives in `eval/`; this module is the
small core it and the CLI's main job share.
"""

from __future__ import annotations

import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .api import patch_model, unpatch_model
from .config import PatchConfig


# ----------------------------------------------------------------------------- text sources


def fallback_text() -> tuple[str, str]:
    """English prose that ships with every CPython: the help topics of `pydoc_data` (~0.5 MB)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)), "Python's bundled pydoc_data help topics"


def _read_wikitext_folder(path: Path, split: str) -> str | None:
    for name in (f"{split}.txt", f"wiki.{split}.tokens", f"wiki.{split}.raw"):
        if (path / name).exists():
            return (path / name).read_text(encoding="utf-8")
    return None


def load_text(source: str | None = None, split: str = "test") -> tuple[str, str]:
    """(text, description). source: None (WikiText-2 when found, else the offline fallback), a
    text file, a WikiText-2 folder, or "wikitext2" (hub, through `datasets`)."""
    if source in (None, "auto"):
        for folder in _default_wikitext_folders():
            text = _read_wikitext_folder(folder, split)
            if text:
                return text, f"WikiText-2 {split} ({folder})"
        try:
            return load_text("wikitext2", split)
        except Exception:
            text, what = fallback_text()
            return text, f"{what} (offline and no WikiText-2 found; pass --data PATH for WikiText-2)"
    if source == "wikitext2":
        from datasets import load_dataset

        data = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        return "\n\n".join(data["text"]), f"WikiText-2 raw {split} (hub)"
    if source == "fallback":
        return fallback_text()
    path = Path(source)
    if path.is_dir():
        text = _read_wikitext_folder(path, split)
        if text is None:
            raise FileNotFoundError(f"{path} has no {split}.txt / wiki.{split}.tokens")
        return text, f"{path}/{split}"
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    raise FileNotFoundError(f"no text at {source!r}: give a text file, a WikiText-2 folder, 'wikitext2' or 'fallback'")


def _default_wikitext_folders() -> list[Path]:
    folders = []
    if os.environ.get("ATTNPATCH_DATA"):
        folders.append(Path(os.environ["ATTNPATCH_DATA"]) / "wikitext-2")
    here = Path.cwd()
    folders += [here / "../shared/data/wikitext-2", here / "shared/data/wikitext-2"]
    return [f.resolve() for f in folders if f.exists()]


# ----------------------------------------------------------------------------- memory


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


# ----------------------------------------------------------------------------- perplexity


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int
    seconds: float
    peak_bytes: int
    windows: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, window: int = 1024, max_tokens: int | None = None,
               desc: str = "perplexity", progress: bool = True, warmup: bool = True) -> PerplexityResult:
    """Perplexity over consecutive non-overlapping windows of `window` tokens (each window starts
    fresh, so every method sees the same contexts). input_ids: 1-D token ids.

    With `warmup`, one unmeasured forward on the first window runs first, so one-time costs
    (first-touch memory, lazy initialisation) are not charged to whichever method runs first."""
    ids = input_ids.reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    starts = list(range(0, max(1, ids.numel() - 1), window))
    device = next(model.parameters()).device
    if warmup:
        model(input_ids=ids[:window].to(device)[None], use_cache=False)
    total_nll, counted = 0.0, 0
    with peak_memory() as mem:
        t0 = time.perf_counter()
        for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
            chunk = ids[start : start + window].to(device)
            if chunk.numel() < 2:
                continue
            logits = model(input_ids=chunk[None], use_cache=False).logits[0].float()
            nll = torch.nn.functional.cross_entropy(logits[:-1], chunk[1:], reduction="sum")
            total_nll += float(nll)
            counted += chunk.numel() - 1
        seconds = time.perf_counter() - t0
    mean = total_nll / max(counted, 1)
    return PerplexityResult(math.exp(mean), mean, counted, seconds, mem["bytes"], len(starts))


# ----------------------------------------------------------------------------- method specs


def parse_method_spec(spec: str) -> PatchConfig | None:
    """'dense' -> None; 'sliding_window:window=64,sinks=4' -> PatchConfig (values parsed as
    int, float, bool or string)."""
    spec = spec.strip()
    if spec in ("dense", "none", "baseline"):
        return None
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad parameter {item!r} in {spec!r}: expected key=value")
        params[key.strip()] = parse_value(value.strip())
    return PatchConfig(name.strip(), params).validated()


def parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def describe(config: PatchConfig | None) -> str:
    if config is None:
        return "dense"
    params = ",".join(f"{k}={v}" for k, v in config.params.items() if v is not None)
    return f"{config.method}({params})" if params else config.method


def compare(model, input_ids: torch.Tensor, specs: list[str], window: int = 1024, max_tokens: int | None = None,
            progress: bool = True) -> list[dict]:
    """Perplexity, tokens/s and peak memory for each method spec, dense measured in the same run."""
    rows = []
    for spec in tqdm(specs, desc="methods", disable=not progress):
        config = parse_method_spec(spec)
        if config is not None:
            patch_model(model, config)
        try:
            res = perplexity(model, input_ids, window=window, max_tokens=max_tokens, desc=describe(config),
                             progress=progress)
        finally:
            if config is not None:
                unpatch_model(model)
        rows.append({"method": spec if config is not None else "dense", "config": describe(config),
                     "perplexity": res.perplexity, "tokens": res.tokens, "tokens_per_s": res.tokens_per_second,
                     "peak_mb": res.peak_bytes / 2**20, "seconds": res.seconds})
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for row in rows:
        row["speed_vs_dense"] = row["tokens_per_s"] / dense["tokens_per_s"] if dense else float("nan")
    return rows


def format_table(rows: list[dict]) -> str:
    width = max(len("method"), *(len(r["method"]) for r in rows))
    head = f"{'method':<{width}} {'perplexity':>11} {'tokens/s':>9} {'vs dense':>9} {'peak MB':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<{width}} {r['perplexity']:>11.2f} {r['tokens_per_s']:>9.0f} "
                     f"{r['speed_vs_dense']:>8.2f}x {r['peak_mb']:>8.0f}")
    return "\n".join(lines)
