"""Training text: local text files (read directly), local JSON files or a hub dataset (through
`datasets`), tokenised and packed into fixed-length blocks."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import DataConfig


def _load_text(sources: list[str], data: DataConfig, split: str) -> str:
    if not sources:
        return ""
    if len(sources) == 1 and not Path(sources[0]).exists():  # a hub dataset id
        from datasets import load_dataset

        ds = load_dataset(sources[0], data.hub_config, split=split)
        return "\n\n".join(t for t in ds[data.text_field] if t)
    missing = [s for s in sources if not Path(s).exists()]
    if missing:
        raise FileNotFoundError(f"data files not found: {missing}")
    if Path(sources[0]).suffix.lower() not in (".json", ".jsonl"):
        # plain text, one document per file (what `datasets`' text builder gives with sample_by=document),
        # read directly: a GPU image without `datasets` still trains on local files
        return "\n\n".join(t for t in (Path(s).read_text(encoding="utf-8") for s in sources) if t)
    from datasets import load_dataset

    ds = load_dataset("json", data_files={"data": [str(Path(s).resolve()) for s in sources]}, split="data")
    return "\n\n".join(t for t in ds[data.text_field] if t)


def packed_blocks(tokenizer, sources: list[str], data: DataConfig, tokens: int, split: str) -> torch.Tensor:
    """(N, seq_len) token blocks covering up to `tokens` tokens of the sources."""
    text = _load_text(sources, data, split)
    if not text:
        return torch.empty(0, data.seq_len, dtype=torch.long)
    ids = tokenizer(text, return_tensors="pt").input_ids[0][:tokens]
    n = ids.numel() // data.seq_len
    if n == 0:
        raise ValueError(f"only {ids.numel()} tokens of data, fewer than seq_len={data.seq_len}")
    return ids[: n * data.seq_len].reshape(n, data.seq_len)
