"""A checkpoint written by an earlier attnpatch (before the package layout moved) still loads: a
tiny Llama with layer 0's first kv group pruned (baked into the weights) and lolcats with trained
feature maps and gates (re-applied from attnpatch_config.json), giving the logits recorded then."""

from pathlib import Path

import tiny_models as tm
import torch
from safetensors.torch import load_file

from attnpatch import load_patched, patched_configs

DATA = Path(__file__).parent / "data"


def test_checkpoint_written_before_the_layout_moved_loads_with_the_same_outputs():
    model = load_patched(DATA / "checkpoint_v1").eval()
    assert [c.method for c in patched_configs(model)] == ["prune_heads", "lolcats"]  # compacted, re-applied
    assert model.model.layers[0].self_attn.k_proj.out_features == 16  # one kv group of 2 left
    expected = load_file(str(DATA / "checkpoint_v1_logits.safetensors"))["logits"]
    assert torch.allclose(tm.run("llama", model, left_pad=2), expected, atol=1e-5)


def test_checkpoint_written_before_methods_registered_themselves_loads_with_the_same_outputs():
    """Written by the code of 2026-12-07 (before the registry scan, the runtime split and the model parts):
    kv_merge on layer 0 (baked into the weights, its module since moved to methods/kv), mla with keys
    before RoPE on layer 1 (its rotary embedding now found through the adapter's parts) and hedgehog
    linear attention on layer 2 (feature maps now built from a table), trained parameters perturbed."""
    model = load_patched(DATA / "checkpoint_v2").eval()
    assert [(c.method, c.layers) for c in patched_configs(model)] == [("kv_merge", [0]), ("mla", [1]), ("linear", [2])]
    assert model.model.layers[0].self_attn.k_proj.out_features == 16  # 2 kv heads fused into 1
    expected = load_file(str(DATA / "checkpoint_v2_logits.safetensors"))["logits"]
    assert torch.allclose(tm.run("llama", model, left_pad=2), expected, atol=1e-5)
