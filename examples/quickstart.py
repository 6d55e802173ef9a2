"""First steps: patch SmolLM2's attention, compare, and restore it.

    python examples/quickstart.py
"""

import torch

from attnpatch import cache_nbytes, list_methods, patch_model, unpatch_model
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
