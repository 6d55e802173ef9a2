"""A method's row in the method matrix (tests/test_matrix.py), declared in the method's own test file as
`MATRIX_CASES = {"name": MatrixCase(...)}`: adding a method is its file, its test file and the docs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class MatrixRun:
    """What a case's activity check can look at after the matrix ran the patched model."""

    model: torch.nn.Module
    model_name: str
    cache: object  # the decoder's cache, None for encoders and diffusion models
    params_before: int  # parameter count before patching
    dense_cache_bytes: Callable[[], int]  # bytes the unpatched model's cache holds for the same inputs
    dense_cache_tokens: int  # tokens the unpatched model's cache would hold (prompt with image tokens + steps)
    prompt_lengths: list[int]  # real (unpadded) prompt tokens per row
    steps: int  # tokens decoded through the cache after the prompt
    computed: object  # the sparse kernels' own count of their work during the run (ops/work_count.py)
    change_from_unpatched: float | None  # relative output difference from the unpatched model (None: not measured)


@dataclass
class MatrixCase:
    models: list[str]  # tiny models it runs on: llama, vit, llava, dit
    params: dict = field(default_factory=dict)  # parameters that make it act at the matrix's short lengths
    patch: dict = field(default_factory=dict)  # other patch_model arguments (layers, layer_params)
    cache_layer: str | None = None  # the cache layer type its decoding cache must hold, smaller than dense
    structural: bool = False  # changes weights, not attention calls: activity is shown by `check` alone
    lossy: bool = True  # its output differs from the unpatched model's at these settings (else say why not)
    # a larger half-precision tolerance for methods whose discrete choices flip under rounding (stated there)
    half_precision_tolerance: float | None = None
    check: Callable[[MatrixRun], None] | None = None  # what a dense fallback could not produce


def fewer_parameters(run: MatrixRun) -> None:
    assert sum(p.numel() for p in run.model.parameters()) < run.params_before


def fewer_cached_tokens(run: MatrixRun) -> None:
    """Tokens were dropped or merged before the language model: its cache holds fewer positions."""
    if run.model_name == "llava":
        assert run.cache.get_seq_length() < run.dense_cache_tokens


def sparse_kernel_skipped_blocks(run: MatrixRun) -> None:
    """A sparse kernel ran (not the exact fallback) and, where it works on a block grid, computed fewer
    (query block, key block) pairs than dense attention has on the same grids."""
    work = run.computed
    assert work.calls > 0 and work.scores > 0, f"no sparse kernel ran: {work}"
    assert work.pairs < work.dense_pairs or work.dense_pairs == 0, f"every block was computed: {work}"
