"""Every adapter: softmax parity with eager, exact restoration, padding, generate(), linear and
sliding_window on decoders, encoders and diffusion transformers."""

import pytest
import tiny_models as tm
import torch

from attnpatch import cache_nbytes, patch_model, unpatch_model
from attnpatch.runtime.layers import RecurrentStateLayer

TRANSFORMERS = [n for n in tm.ALL_MODELS if n not in tm.DIFFUSERS]


def eager_reference(name, model, **kw):
    """The model's own output with eager attention (diffusers: its default processors)."""
    if name in tm.DIFFUSERS:
        return tm.run(name, model, **kw)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        return tm.run(name, model, **kw)
    finally:
        model.set_attn_implementation(previous)


@pytest.mark.parametrize("name", tm.ALL_MODELS)
def test_softmax_parity_and_exact_unpatch(name):
    model = tm.build(name)
    before = tm.run(name, model)
    keys = list(model.state_dict())
    reference = eager_reference(name, model)
    patch_model(model, "softmax")
    patched = tm.run(name, model)
    err = (patched - reference).abs().max().item()
    assert err <= 1e-5, f"{name}: softmax vs eager max error {err:.2e}"
    unpatch_model(model)
    assert torch.equal(tm.run(name, model), before)
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("name", list(tm.DECODERS))
def test_left_padded_batch_parity(name):
    model = tm.build(name)
    _, mask = tm.text_batch(left_pad=4)
    reference = eager_reference(name, model, left_pad=4)
    patch_model(model, "softmax")
    patched = tm.run(name, model, left_pad=4)
    real = mask.bool()
    assert (patched[real] - reference[real]).abs().max() <= 1e-5
    # padded sequence equals the same sequence run alone without padding
    ids, _ = tm.text_batch(left_pad=4)
    with torch.no_grad():
        alone = model(input_ids=ids[:1, 4:]).logits
    assert (patched[0, 4:] - alone[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "phi3"])
def test_generate_with_cache_matches_eager(name):
    model = tm.build(name)
    ids, mask = tm.text_batch(length=8, left_pad=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    model.set_attn_implementation("eager")
    expected = model.generate(ids, **kwargs, output_scores=True, return_dict_in_generate=True)
    patch_model(model, "softmax")
    got = model.generate(ids, **kwargs, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(got.scores, expected.scores)) <= 1e-4


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma2", "phi3"])
@pytest.mark.parametrize("feature_map", ["elu", "hedgehog", "performer", "taylor"])
def test_linear_decoding_state_matches_full_forward(name, feature_map):
    """Token-by-token decoding through the recurrent state equals one full causal forward, and the
    state does not grow with length."""
    model = tm.build(name)
    patch_model(model, "linear", feature_map=feature_map, chunk_size=4)
    ids, _ = tm.text_batch(length=14)
    from transformers import DynamicCache

    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids[:, :6], past_key_values=cache, use_cache=True)
        steps = [out.logits]
        sizes = [cache_nbytes(cache)]
        for t in range(6, 14):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            sizes.append(cache_nbytes(cache))
    assert all(isinstance(layer, RecurrentStateLayer) for layer in cache.layers)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-4)
    assert len(set(sizes)) == 1 and sizes[0] > 0  # constant-size state
    assert cache.get_seq_length() == 14


def test_linear_generate_padded_batch_equals_unpadded():
    model = tm.build("llama")
    patch_model(model, "linear")
    ids, mask = tm.text_batch(length=9, left_pad=3)
    padded = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone = model.generate(ids[:1, 3:], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(padded[0, 3:], alone[0])


@pytest.mark.parametrize("name", tm.ALL_MODELS)
def test_linear_and_sliding_window_run_everywhere(name):
    model = tm.build(name)
    dense = tm.run(name, model)
    patch_model(model, "linear")
    linear = tm.run(name, model)
    unpatch_model(model)
    assert torch.isfinite(linear).all() and not torch.allclose(linear, dense, atol=1e-3)
    # a window covering every token is exactly dense attention
    patch_model(model, "sliding_window", window=4096)
    assert (tm.run(name, model) - dense).abs().max() <= 1e-5
    unpatch_model(model)
    patch_model(model, "sliding_window", window=2, sinks=1)
    narrow = tm.run(name, model)
    unpatch_model(model)
    assert torch.isfinite(narrow).all() and not torch.allclose(narrow, dense, atol=1e-4)
    assert torch.equal(tm.run(name, model), dense)


def test_sliding_window_model_equals_masked_reference():
    """Whole-model check: the block-wise path equals dense attention with the window mask."""
    from attnpatch import Method, register_method
    from attnpatch.ops.reference import naive_attention

    @register_method
    class MaskedWindowReference(Method):
        name = "_test_masked_window"
        family = "test"
        summary = "dense attention with an explicit window+sink mask, counted in each row's real tokens"

        def attention(self, call):
            valid = call.key_valid()
            if valid is None or not call.causal:
                return naive_attention(call.query, call.key, call.value, call.mask, causal=call.causal,
                                       scaling=call.scaling, softcap=call.softcap, window=3, sinks=2)
            rank = valid.long().cumsum(-1) - 1  # a left-padded row's sinks are its first real tokens
            q_rank, k_rank = rank[:, None, :, None], rank[:, None, None, :]
            allowed = (k_rank <= q_rank) & ((q_rank - k_rank < 3) | (k_rank < 2)) & valid[:, None, None, :]
            return naive_attention(call.query, call.key, call.value, call.mask & allowed, causal=False,
                                   scaling=call.scaling, softcap=call.softcap)

    for name in ["llama", "gemma2", "vit"]:
        model = tm.build(name)
        patch_model(model, "_test_masked_window")
        ref = tm.run(name, model, left_pad=2) if name in tm.DECODERS else tm.run(name, model)
        unpatch_model(model)
        patch_model(model, "sliding_window", window=3, sinks=2, block_size=5)
        got = tm.run(name, model, left_pad=2) if name in tm.DECODERS else tm.run(name, model)
        if name in tm.DECODERS:
            real = tm.text_batch(left_pad=2)[1].bool()
            ref, got = ref[real], got[real]
        assert (got - ref).abs().max() <= 1e-5, name


def test_towers_select_one_stack():
    model = tm.build("llava")
    dense = tm.run("llava", model)
    patch_model(model, "linear", towers=["vision_tower"])
    sites = [m for m in model.modules() if "_attnpatch_method" in m.__dict__]
    assert len(sites) == model.config.vision_config.num_hidden_layers
    assert not torch.allclose(tm.run("llava", model), dense, atol=1e-4)
    unpatch_model(model)
    patch_model(model, "linear", towers="language_model", layers=[-1])
    sites = [m for m in model.modules() if "_attnpatch_method" in m.__dict__]
    assert len(sites) == 1 and sites[0].layer_idx == model.config.text_config.num_hidden_layers - 1


def test_clip_text_tower_is_causal_vision_is_not():
    model = tm.build("clip")
    seen = {}
    from attnpatch import Method, register_method

    @register_method
    class Spy(Method):
        name = "_test_spy"
        family = "test"
        summary = "records causality"

        def attention(self, call):
            seen[self.site.tower] = call.causal
            from attnpatch.ops.reference import naive_attention
            return naive_attention(call.query, call.key, call.value, call.mask, causal=call.causal, scaling=call.scaling)

    patch_model(model, "_test_spy")
    tm.run("clip", model)
    assert seen == {"text_model.encoder.layers": True, "vision_model.encoder.layers": False}


def test_per_layer_overrides():
    model = tm.build("llama")
    patch_model(model, "sliding_window", window=8, layer_params={1: {"window": 2}})
    windows = [layer.self_attn.__dict__["_attnpatch_method"].config["window"] for layer in model.model.layers]
    assert windows == [8, 2, 8]


def test_pixart_cross_attention_only_when_asked():
    model = tm.build("pixart")
    patch_model(model, "linear")
    patched = [n for n, m in model.named_modules() if "_attnpatch_original_processor" in m.__dict__]
    assert patched and all(n.endswith("attn1") for n in patched)
    unpatch_model(model)
    patch_model(model, "linear", include_cross_attention=True)
    patched = [n for n, m in model.named_modules() if "_attnpatch_original_processor" in m.__dict__]
    assert any(n.endswith("attn2") for n in patched)


def test_source_checks_see_through_decorated_init_and_forward():
    """transformers 5.25 wraps LlamaAttention.__init__ in a decorator whose own source names nothing
    of the model and keeps the original only in a closure cell; the adapter's source checks (does
    __init__ read config.head_dim, does forward route through the attention interface) must still
    read the original, or a pruned checkpoint silently keeps the full head count."""
    import functools

    from attnpatch.adapters.hf_introspection import _reads_config_head_dim, _routes_through_interface

    def closure_wrapped(function):  # the 5.25 pattern: no functools.wraps, original in the closure
        def new_function(self, *args, **kwargs):
            return function(self, *args, **kwargs)
        return new_function

    def wraps_wrapped(function):
        @functools.wraps(function)
        def wrapper(self, *args, **kwargs):
            return function(self, *args, **kwargs)
        return wrapper

    from transformers.models.llama.modeling_llama import LlamaAttention

    for wrap in (closure_wrapped, wraps_wrapped):
        wrapped = type("WrappedAttention", (LlamaAttention,), {"__init__": wrap(LlamaAttention.__init__),
                                                                "forward": wrap(LlamaAttention.forward)})
        assert _reads_config_head_dim(wrapped) and _routes_through_interface(wrapped), wrap.__name__
    plain = type("PlainAttention", (torch.nn.Module,), {"__init__": lambda self, config: None,
                                                        "forward": lambda self, x: x})
    assert not _reads_config_head_dim(plain) and not _routes_through_interface(plain)
