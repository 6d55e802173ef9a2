"""What the benchmark scripts share: the repository root on the import path (eval.*, and tests/ for the
tiny models), SmolLM2-135M for timing (or its architecture with random weights where the checkpoint is
not installed), torch.compile counters, and the block budgets that make a sparse method keep a share of
the causal blocks."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (str(ROOT), str(ROOT / "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# SmolLM2-135M's architecture (its config.json), for timing where the checkpoint is not installed
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu",
                    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2, pad_token_id=2)
# the FlexAttention kernel is compiled once per shape bucket and dtype: the backend rows' and the speed
# rows' together may pass dynamo's default of 8, after which it runs eagerly (an L x L score matrix)
FLEX_RECOMPILE_LIMIT = 128


def short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def speed_model():
    """(SmolLM2-135M, what it is): the checkpoint where installed, else its architecture with random
    weights (the same shapes and arithmetic, so the same time)."""
    from attnpatch.models import load_default_model

    try:
        return load_default_model()[0], "SmolLM2-135M"
    except (FileNotFoundError, ImportError) as exc:
        from transformers import LlamaConfig, LlamaForCausalLM

        print(f"speed: SmolLM2's checkpoint is not installed ({short_error(exc)}); timing its architecture "
              "with random weights", flush=True)
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)), "SmolLM2-135M architecture, random weights"


def dynamo_counts() -> dict:
    """How often torch.compile captured and recompiled (the FlexAttention kernel is its only user here)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {group: dict(counters[group]) for group in ("stats", "recompiles") if counters.get(group)}
