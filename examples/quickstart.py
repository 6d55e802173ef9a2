"""First steps: patch SmolLM2's attention, compare, and restore it.

    python examples/quickstart.py
"""

import torch

from attnpatch import cache_kwargs, cache_nbytes, list_methods, patch_model, unpatch_model
from attnpatch.models import load_default_model

model, tokenizer = load_default_model()
model.eval()
prompt = tokenizer("The three primary colours are", return_tensors="pt")


def complete(label):
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    print(f"{label:>32}: {tokenizer.decode(out[0, prompt.input_ids.shape[1]:], skip_special_tokens=True)!r}")


print("methods:", ", ".join(m.name for m in list_methods()))
complete("dense")
patch_model(model, "sliding_window", window=64, sinks=4)
complete("sliding_window(64, 4 sinks)")
unpatch_model(model)
patch_model(model, "linear", feature_map="elu")
complete("linear (untrained)")
unpatch_model(model)
complete("dense again (unpatched)")

# KV-cache compression: the cache really shrinks, measured from its tensors
from transformers import DynamicCache  # noqa: E402

long_prompt = tokenizer("The history of the city. " * 60 + "To sum up,", return_tensors="pt")
for label, method in (("dense", None), ("snapkv, 75% evicted", "snapkv")):
    if method:
        patch_model(model, method, compression=0.75)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.generate(**long_prompt, **cache_kwargs(model, cache), max_new_tokens=10, do_sample=False)
    print(f"{label:>32}: KV cache {cache_nbytes(cache) / 2**20:.1f} MiB after {cache.get_seq_length()} tokens")
    if method:
        unpatch_model(model)
