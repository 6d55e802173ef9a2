"""Per-head block top-k budgets from calibration data: the recall curve against a brute-force count
over block_topk layouts and naive softmax weights; the model-level helper's budgets, their recall,
the config they produce and its save/load round trip."""

import pytest
import tiny_models as tm
import torch

from attnpatch import (
    PatchError,
    calibrate_block_topk,
    load_patched,
    patch_model,
    patched_configs,
    save_patched,
    unpatch_model,
)
from attnpatch.ops.block_sparse import dense_mask
from attnpatch.ops.reference import causal_mask, repeat_kv
from attnpatch.ops.block_selection import block_topk, block_topk_recall


def brute_force_recall(q, k, bs, causal, mask, budget, **kw):
    """Mean over real query rows (per kv head) of the softmax mass block_topk(top_k=budget) keeps."""
    lq, lk = q.shape[-2], k.shape[-2]
    groups = q.shape[1] // k.shape[1]
    valid = None if mask is None else mask.any(-2).any(1).expand(q.shape[0], -1)
    layout = block_topk(q, k, bs, causal=causal, top_k=budget, valid=valid, **kw)
    kept = dense_mask(layout, lq, lk, causal).repeat_interleave(groups, dim=1)
    scores = q @ repeat_kv(k, groups).transpose(-1, -2) * 0.3
    allowed = torch.ones(lq, lk, dtype=torch.bool) if not causal else causal_mask(lq, lk, q.device)
    if mask is not None:
        allowed = allowed & mask
    weights = torch.nan_to_num(scores.masked_fill(~allowed, float("-inf")).softmax(-1), nan=0.0)
    mass = (weights * kept).sum(-1)  # (B, Hq, Lq)
    real = (weights.sum(-1) > 0).float()
    per_kv = (mass * real).view(q.shape[0], k.shape[1], groups, lq).sum(dim=(0, 2, 3))
    return per_kv / real.view(q.shape[0], k.shape[1], groups, lq).sum(dim=(0, 2, 3))


@pytest.mark.parametrize("causal,lq,padded", [(True, 37, True), (True, 20, False), (False, 37, True)])
@pytest.mark.parametrize("pooling", ["mean", "maxmin"])
def test_recall_curve_matches_brute_force(causal, lq, padded, pooling):
    g = torch.Generator().manual_seed(0)
    lk, bs = 37, 4
    q, k = torch.randn(2, 4, lq, 8, generator=g), torch.randn(2, 2, lk, 8, generator=g)
    mask = None
    if padded:
        mask = torch.ones(2, 1, lq, lk, dtype=torch.bool)
        mask[0, ..., :5] = False
    kw = dict(pooling=pooling, sink_blocks=1, local_blocks=2)
    valid = None if mask is None else mask.any(-2).any(1).expand(2, -1)
    recall, rows = block_topk_recall(q, k, bs, causal=causal, scaling=0.3, mask=mask, valid=valid, chunk=8, **kw)
    curve = recall / rows[:, None]
    for budget in range(curve.shape[-1]):
        assert torch.allclose(curve[:, budget], brute_force_recall(q, k, bs, causal, mask, budget, **kw), atol=1e-5)
    assert torch.all(curve[:, 1:] >= curve[:, :-1] - 1e-6)  # more blocks, more mass
    assert torch.allclose(curve[:, -1], torch.ones(2), atol=1e-5)  # every block: all the mass


def test_calibration_budgets_config_and_round_trip(tmp_path):
    model = tm.build("llama")
    ids, mask = tm.text_batch(length=40, left_pad=3)
    batches = [{"input_ids": ids, "attention_mask": mask}]
    loose = calibrate_block_topk(model, batches, recall=0.6, block_size=4, progress=False)
    tight = calibrate_block_topk(model, batches, recall=0.97, block_size=4, progress=False)
    assert not patched_configs(model)  # calibration leaves the model unpatched
    assert sorted(tight.budgets) == [0, 1, 2] and all(len(b) == 2 for b in tight.budgets.values())
    for layer in tight.budgets:
        for h in range(2):
            assert loose.budgets[layer][h] <= tight.budgets[layer][h]
            assert tight.achieved[layer][h] >= 0.97 - 1e-6
            budget = tight.budgets[layer][h]
            if budget > 0:  # the smallest budget: one block fewer misses the target
                assert tight.curves[layer][h, budget - 1] < 0.97
    assert "| layer |" in tight.table()
    config = tight.config
    assert config.layer_params[1]["head_top_k"] == tight.budgets[1]
    dense = model(input_ids=ids, attention_mask=mask).logits
    patch_model(model, config)
    sparse = model(input_ids=ids, attention_mask=mask).logits
    save_patched(model, tmp_path / "calibrated")
    reloaded = load_patched(tmp_path / "calibrated").eval()
    assert patched_configs(reloaded)[0].layer_params == config.layer_params
    real = mask.bool()
    assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits[real], sparse[real])
    unpatch_model(model)
    everything = calibrate_block_topk(model, batches, recall=1.0, block_size=4, progress=False)
    patch_model(model, everything.config)
    assert (model(input_ids=ids, attention_mask=mask).logits[real] - dense[real]).abs().max() <= 1e-4


def test_calibration_errors():
    model = tm.build("llama")
    with pytest.raises(PatchError, match="recall"):
        calibrate_block_topk(model, [tm.text_batch()[0]], recall=1.5)
    with pytest.raises(PatchError, match="longer than block_size"):
        calibrate_block_topk(model, [tm.text_batch(length=12)[0]], block_size=64, progress=False)
    assert not patched_configs(model)
    with pytest.raises(PatchError, match="towers"):
        calibrate_block_topk(tm.build("clip"), [], block_size=4, progress=False)


def test_budget_allocation_maximises_summed_recall():
    """mean_top_k spends at most that many blocks per head, and its summed recall is at least that
    of any uniform budget with no more blocks in total (uniform is one of the allocations it weighs)."""
    model = tm.build("llama")
    ids, mask = tm.text_batch(length=40, left_pad=3)
    found = calibrate_block_topk(model, [{"input_ids": ids, "attention_mask": mask}], mean_top_k=2.5,
                                 block_size=4, progress=False)
    assert found.recall is None and found.mean_budget() <= 2.5 + 1e-9
    summed = sum(sum(r) for r in found.achieved.values())
    heads = sum(c.shape[0] for c in found.curves.values())
    uniform = int(found.mean_budget() * heads) // heads
    assert summed >= sum(float(c[:, uniform].sum()) for c in found.curves.values()) - 1e-6
    again = found.choose(recall=0.9)  # the same curves, another choice, no model run
    assert again.recall == 0.9 and again.config.layer_params[0]["head_top_k"] == again.budgets[0]
    with pytest.raises(PatchError, match="mean_top_k"):
        found.choose(mean_top_k=-1)
