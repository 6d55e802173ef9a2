"""Head pruning in five steps: score SmolLM2's heads, remove a third of its kv groups, check the
perplexity, save with plain transformers, and reload in a way any transformers user can.

    python examples/prune_heads.py          # ~2 min on 2 CPU cores
"""

import tempfile

import torch
from transformers import AutoModelForCausalLM

from attnpatch import head_importance, patch_model
from attnpatch.evaluation.data import load_text
from attnpatch.evaluation.perplexity import windowed_perplexity
from attnpatch.models import load_default_model

model, tokenizer = load_default_model()
model.eval()
valid = tokenizer(load_text(split="valid")[0], return_tensors="pt").input_ids[0]
test = tokenizer(load_text(split="test")[0], return_tensors="pt").input_ids[0][:4096]
calibration = [valid[i * 256:(i + 1) * 256][None] for i in range(8)]


def perplexity():
    return windowed_perplexity(model, test, max_length=512, progress=False).perplexity


def parameters():
    return sum(p.numel() for p in model.parameters()) / 1e6


print(f"dense: perplexity {perplexity():.2f}, {parameters():.2f}M parameters")
importance = head_importance(model, calibration)  # gradient, output norm, attention entropy
importance.plot("head_importance.png")
print(importance.table("gradient", digits=2).splitlines()[:5])

config = importance.plan(1 / 3, score="gradient", unit="group")  # 1 of 3 kv groups in every layer
patch_model(model, config)
print(f"pruned: perplexity {perplexity():.2f}, {parameters():.2f}M parameters "
      f"({model.config.num_attention_heads} heads, {model.config.num_key_value_heads} kv heads per layer)")

folder = tempfile.mkdtemp()
model.save_pretrained(folder)  # a plain checkpoint: no attnpatch needed to load it
reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
probe = test[:64][None]
with torch.no_grad():
    difference = (reloaded(probe).logits - model(probe).logits).abs().max().item()
print(f"reloaded with plain transformers from {folder}: max logit difference {difference:.1e}")
# recover quality with LoRA: recipes/smollm2_prune_recover.yaml (accelerate launch ...)
