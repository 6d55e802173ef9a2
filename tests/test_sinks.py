"""Sink inspector: attention mass on the first token and on other sinks equal eager attention
weights; massive-activation dimensions equal the hidden states'; decoders, ViT, CLIP."""

import pytest
import tiny_models as tm
import torch

from attnpatch import PatchError
from attnpatch.analysis.sink_inspector import inspect_sinks


def test_masses_and_massive_dims_match_eager_attention_and_hidden_states(tmp_path):
    model = tm.build("llama")
    ids = torch.randint(3, tm.V - 2, (2, 16), generator=torch.Generator().manual_seed(0))
    report = inspect_sinks(model, [ids], top_tokens=2, progress=False)
    model.set_attn_implementation("eager")
    out = model(ids, output_attentions=True, output_hidden_states=True)
    model.set_attn_implementation("sdpa")
    for layer, weights in enumerate(out.attentions):  # (B, H, L, L); query 0 sees only key 0: skipped
        first = weights[..., 1:, 0].mean(-1).mean(0)
        assert torch.allclose(report.first_token["model.layers"][layer], first, atol=1e-5)
        columns = weights[..., 1:, 1:].mean(-2)  # (B, H, L - 1): mean over the queries that see > 1 key
        top = columns.mean(1).topk(2, dim=-1).indices
        other = torch.gather(columns, -1, top[:, None].expand(-1, 4, -1)).sum(-1).mean(0)
        assert torch.allclose(report.other_sinks["model.layers"][layer], other, atol=1e-5)
        magnitude = out.hidden_states[layer + 1].abs().amax(dim=(0, 1))
        assert report.massive["model.layers"][layer]["dims"] == magnitude.topk(3).indices.tolist()
    assert "| 0 |" in report.table()
    assert report.plot(tmp_path / "sinks.png").stat().st_size > 5000
    assert not model.__dict__.get("_attnpatch_record")


def test_encoders_and_towers():
    clip = tm.build("clip")
    ids, mask = tm.text_batch(length=10)
    report = inspect_sinks(clip, [{"input_ids": ids, "attention_mask": mask, "pixel_values": tm.pixels()}],
                           progress=False)
    assert report.towers == ["text_model.encoder.layers", "vision_model.encoder.layers"]
    assert set(report.massive) == set(report.towers)
    # bidirectional vision tower: every query sees all 17 tokens; masses are fractions of one
    vision = report.first_token["vision_model.encoder.layers"]
    assert bool(((vision > 0) & (vision < 1)).all())
    with pytest.raises(PatchError, match="several attention stacks"):
        report.table()
    vit = inspect_sinks(tm.build("vit"), [{"pixel_values": tm.pixels()}], progress=False)
    assert vit.first_token["layers"].shape == (2, 4) and len(vit.massive["layers"]) == 2
    with pytest.raises(PatchError, match="selects no self-attention"):
        inspect_sinks(clip, [], towers="audio")
