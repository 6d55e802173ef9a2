"""The patched model through the whole workflow (issue 40): peft wrappers and inner modules find the
patch state, saving a peft-wrapped model loses no weights, and bad input is a clear error that leaves
the model as it was."""

import json
import math

import pytest
import tiny_models as tm
import torch
from peft import LoraConfig, get_peft_model

from attnpatch import (PatchError, cache_nbytes, is_patched, load_patched, patch_model, patched_configs, save_patched,
                       unpatch_model)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def lora(model):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))


def test_unpatch_through_a_peft_wrapper_restores_the_bitwise_original():
    model = tm.build("llama")
    ids = tm.text_batch(length=12)[0]
    before = logits(model, ids)
    peft_model = lora(patch_model(model, "linear", feature_map="hedgehog"))  # LoRA starts as the identity
    assert is_patched(peft_model) and [c.method for c in patched_configs(peft_model)] == ["linear"]
    assert not torch.equal(logits(peft_model, ids), before)
    assert unpatch_model(peft_model) is peft_model
    assert not is_patched(peft_model) and not is_patched(model)
    assert torch.equal(logits(peft_model, ids), before)


def test_patching_a_peft_wrapper_patches_the_model_inside():
    model = tm.build("llama")
    peft_model = lora(model)
    assert patch_model(peft_model, "sliding_window", window=4) is peft_model
    assert [c.method for c in patched_configs(model)] == ["sliding_window"]


def test_unpatch_of_the_outer_model_or_an_inner_module_finds_the_patch():
    model = tm.build("llama")
    ids = tm.text_batch(length=12)[0]
    before = logits(model, ids)
    patch_model(model.model, "sliding_window", window=4)  # the inner LlamaModel
    assert is_patched(model) and is_patched(model.model.layers[0])
    unpatch_model(model)  # the outer model
    assert not is_patched(model.model) and torch.equal(logits(model, ids), before)
    patch_model(model, "sliding_window", window=4)
    unpatch_model(model.model.layers[1].self_attn)  # one of its modules
    assert not is_patched(model) and torch.equal(logits(model, ids), before)
    with pytest.warns(UserWarning, match="nothing in or around this LlamaForCausalLM is patched"):
        unpatch_model(model)


def test_peft_workflow_trains_saves_merged_and_reloads_with_identical_logits(tmp_path):
    """patch -> get_peft_model -> a training step -> save_patched(peft model) -> load_patched: the
    checkpoint holds the base weights under their own names with LoRA merged, and attnpatch's trained
    feature maps beside them."""
    model = tm.build("llama")
    ids = tm.text_batch(length=12)[0]
    peft_model = lora(patch_model(model, "linear", feature_map="hedgehog"))
    for name, parameter in peft_model.named_parameters():
        parameter.requires_grad = "lora_" in name or "attnpatch_" in name
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    trained = logits(peft_model, ids)
    save_patched(peft_model, tmp_path / "saved")
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "saved" / "model.safetensors")))
    assert not any("lora_" in k or "base_layer" in k or "attnpatch_" in k for k in keys)
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    reloaded = load_patched(tmp_path / "saved")
    assert torch.allclose(logits(reloaded, ids), trained, atol=1e-5)
    assert not torch.allclose(trained, logits(tm.build("llama"), ids), atol=1e-3)  # training changed something
    # the peft model is as it was: still wrapped, unmerged (merge then unmerge: equal up to float rounding)
    assert any("lora_A" in name for name, _ in peft_model.named_parameters())
    assert not any(getattr(module, "merged", False) for module in peft_model.modules())
    assert torch.allclose(logits(peft_model, ids), trained, atol=1e-6)


def test_a_checkpoint_missing_attention_weights_is_refused_not_initialised(tmp_path):
    model = patch_model(tm.build("llama"), "sliding_window", window=4)
    save_patched(model, tmp_path / "saved")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / "saved" / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "q_proj" not in k}, str(tmp_path / "saved" / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(PatchError, match=r"missing \['model.layers.0.self_attn.q_proj.weight'"):
        load_patched(tmp_path / "saved")


def untouched(model, before: dict) -> bool:
    return not is_patched(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs,message", [
    ({"method_or_config": "snapkv", "layer_params": {5: {"window": 2}}},
     r"layer_params names layer\(s\) \[5\], out of range for model.layers, which has 3 layers \(valid: -3..2\)"),
    ({"method_or_config": "snapkv", "compression": 0.75, "budget": 10},
     r"budget=10 and compression=0.75 say the same thing two ways; set one of \['budget', 'compression'\]"),
    ({"method_or_config": "snapkv", "compression": math.nan}, r"'compression' of method 'snapkv' must be a finite number"),
    ({"method_or_config": "sliding_window", "window": math.inf}, r"'window' of method 'sliding_window' must be an integer"),
    ({"method_or_config": "act", "alpha": math.inf}, r"'alpha' of method 'act' must be a finite number"),
])
def test_bad_parameters_name_the_fix_and_leave_the_model(kwargs, message):
    model = tm.build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PatchError, match=message):
        patch_model(model, **kwargs)
    assert untouched(model, before)


@pytest.mark.parametrize("value", [None, torch.zeros(3), [1, 2]])
def test_cache_nbytes_names_what_it_takes(value):
    with pytest.raises(PatchError, match=r"cache_nbytes takes a transformers Cache .* got "):
        cache_nbytes(value)


def test_loading_a_missing_folder_or_a_broken_manifest_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*typo/dir' is not a folder here"):
        load_patched(str(tmp_path / "typo" / "dir"))
    model = patch_model(tm.build("llama"), "sliding_window", window=4)
    save_patched(model, tmp_path / "saved")
    (tmp_path / "saved" / "attnpatch_config.json").write_text("{not json")
    with pytest.raises(PatchError, match=r"attnpatch_config.json is not a valid attnpatch checkpoint manifest"):
        load_patched(tmp_path / "saved")
    (tmp_path / "saved" / "attnpatch_config.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(PatchError, match=r"KeyError"):
        load_patched(tmp_path / "saved")


def test_compress_context_takes_token_ids_in_the_forms_users_have_and_names_the_fix_otherwise():
    from attnpatch import compress_context

    model = tm.build("llama")
    ids = tm.text_batch(length=16)[0][:1].clamp(min=14)  # words of the tiny vocabulary: they round-trip as text
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for bad, message in [("some text", r"the context is text; pass token ids: tokenizer\(text"),
                         (ids[:, :0], "the context is empty"),
                         (ids.float(), r"the context must be token ids, a \(B, L\) or \(L,\) integer tensor; got Tensor torch.float32")]:
        with pytest.raises(PatchError, match=message):
            compress_context(model, bad, "snapkv", budget=6, window=2)
        assert untouched(model, before)
    with pytest.raises(PatchError, match=r"attention_mask has shape \(1, 15\), the context \(1, 16\)"):
        compress_context(model, ids, "snapkv", attention_mask=torch.ones(1, 15), budget=6, window=2)
    assert untouched(model, before)
    # the same context as a list of ids, as a tokenizer's output, and as a tensor: the same cache
    tokenizer = tm.tiny_tokenizer()
    encoded = tokenizer(" ".join(tm.word(int(t)) for t in ids[0]), return_tensors="pt")
    caches = []
    for context in (ids, ids[0].tolist(), encoded):
        with compress_context(model, context, "snapkv", budget=6, window=2) as ctx:
            caches.append(ctx.template.layers[0].keys.clone())
    assert all(torch.equal(caches[0], other) for other in caches[1:])

    ctx = compress_context(model, ids, "snapkv", budget=6, window=2)
    with pytest.raises(PatchError, match="the question is text"):
        ctx.generate("what is it?")
    with pytest.raises(PatchError, match="num_beams=2: a compressed context holds one cache per context row"):
        ctx.generate(ids[:, :2], num_beams=2, max_new_tokens=2)
    with pytest.raises(PatchError, match="num_return_sequences=2"):
        ctx.generate(ids[:, :2], num_return_sequences=2, do_sample=True, max_new_tokens=2)
    ctx.close()
    with pytest.raises(PatchError, match="this compressed context was closed"):
        ctx.generate(ids[:, :2], max_new_tokens=2)
    assert untouched(model, before)


def test_output_attentions_on_a_patched_model_says_what_it_returns():
    from attnpatch.errors import _WARNED

    _WARNED.discard("output_attentions")
    model = patch_model(tm.build("llama"), "sliding_window", window=4)
    with pytest.warns(UserWarning, match="output_attentions=True: attnpatch's patched attention modules return no"):
        model(input_ids=tm.text_batch(length=8)[0], output_attentions=True)


def test_saving_untrained_parameters_or_with_save_pretrained_says_so(tmp_path):
    model = patch_model(tm.build("llama"), "linear", feature_map="hedgehog")
    with pytest.warns(UserWarning, match=r"save_pretrained on a patched LlamaForCausalLM writes attnpatch's parameters"):
        model.save_pretrained(tmp_path / "plain")
    with pytest.warns(UserWarning, match=r"the parameters \['linear'\] added are still at their initial values"):
        save_patched(model, tmp_path / "untrained")
    assert "**Untrained**: the parameters linear added" in (tmp_path / "untrained" / "README.md").read_text()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "attnpatch_" in n).add_(0.1)  # as training would
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_patched(model, tmp_path / "trained")
    assert "Untrained" not in (tmp_path / "trained" / "README.md").read_text()
    unpatch_model(model)
    assert "save_pretrained" not in model.__dict__  # the plain method again


def test_a_padded_batch_under_a_sliding_window_holds_about_what_its_rows_hold_alone():
    """Rows of 120 and 90 tokens, window 32 + 4 sinks, 4 decoded tokens: the batch's cache holds each row's
    own sinks (not a run from the first position up to the padded row's sinks) and the shared window:
    <= 1.1x the bytes of the two rows run alone (1.82x before)."""
    from transformers import DynamicCache

    from attnpatch import cache_kwargs

    model = patch_model(tm.build("llama"), "sliding_window", window=32, sinks=4)
    g = torch.Generator().manual_seed(0)
    long, short = torch.randint(14, tm.V - 2, (1, 120), generator=g), torch.randint(14, tm.V - 2, (1, 90), generator=g)

    def held(ids, mask):
        cache = DynamicCache(config=model.config)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                       pad_token_id=0, **cache_kwargs(model, cache))
        return cache_nbytes(cache)

    alone = held(long, torch.ones_like(long)) + held(short, torch.ones_like(short))
    batch_ids = torch.cat([long, torch.cat([torch.zeros(1, 30, dtype=torch.long), short], dim=1)])
    batch_mask = torch.ones_like(batch_ids)
    batch_mask[1, :30] = 0
    assert held(batch_ids, batch_mask) <= 1.1 * alone


def test_compress_context_through_a_peft_wrapper():
    """The wrapper's model is patched, the cache keyword is the wrapped model's (no deprecated keyword), and
    the answer is the one the unwrapped model gives (LoRA starts as the identity)."""
    import warnings

    from attnpatch import cache_kwargs, compress_context

    ids = tm.text_batch(length=16)[0][:1]
    answers = []
    for wrap in (False, True):
        model = tm.build("llama")
        model = lora(model) if wrap else model
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.filterwarnings("error", message=".*past_key_values.*deprecated")
            with compress_context(model, ids, "snapkv", budget=6, window=2) as ctx:
                assert [c.method for c in patched_configs(model)] == ["snapkv"]
                answers.append(ctx.generate(ids[:, :3], max_new_tokens=3, do_sample=False))
        assert not is_patched(model)
    assert torch.equal(answers[0], answers[1])
    assert list(cache_kwargs(lora(tm.build("llama")), None)) == list(cache_kwargs(tm.build("llama"), None))
