"""gated attention: identity at initialisation, per-head gates computed from the block's input,
trainable, saved and reloaded; gate-only training through the recipe."""

import pytest
import tiny_models as tm
import torch

from attnpatch import load_patched, patch_model, save_patched, trainable_parameters, unpatch_model
from attnpatch.runtime.exact import exact_attention  # noqa: F401  (the gated output builds on it)
from method_cases import MatrixCase

# the gate starts at exactly 1 (zero-initialised projection): the output changes once it is trained
MATRIX_CASES = {"gated": MatrixCase(["llama", "vit"], lossy=False)}


@pytest.mark.parametrize("name", ["llama", "qwen3", "vit", "clip"])
def test_gate_starts_as_the_identity(name):
    model = tm.build(name)
    dense = tm.run(name, model)
    patch_model(model, "gated")
    assert torch.allclose(tm.run(name, model), dense, atol=1e-5)
    assert all(n.endswith(("attnpatch_gate.weight", "attnpatch_gate.bias")) for n in trainable_parameters(model))
    unpatch_model(model)
    assert torch.equal(tm.run(name, model), dense)


def test_gates_scale_each_head_from_the_input(tmp_path):
    model = tm.build("llama")
    patch_model(model, "gated", layers=[0])
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        attention.attnpatch_gate.bias.copy_(torch.tensor([0.0, -50.0, 0.0, 0.0]))  # head 1 closed
    captured = {}

    def grab(module, args):
        captured["x"] = args[0].detach()

    hook = attention.o_proj.register_forward_pre_hook(grab)
    gated = tm.run("llama", model)
    hook.remove()
    heads = captured["x"].unflatten(-1, (4, 16))
    assert float(heads[..., 1, :].abs().max()) < 1e-12 and float(heads[..., 0, :].abs().max()) > 0
    save_patched(model, tmp_path)
    assert torch.allclose(tm.run("llama", load_patched(tmp_path)), gated, atol=1e-6)
    elementwise = patch_model(tm.build("llama"), "gated", elementwise=True)
    assert elementwise.model.layers[0].self_attn.attnpatch_gate.out_features == 64
    ids, _ = tm.text_batch()
    loss = elementwise(input_ids=ids, labels=ids).loss
    loss.backward()
    assert elementwise.model.layers[2].self_attn.attnpatch_gate.weight.grad.abs().sum() > 0
