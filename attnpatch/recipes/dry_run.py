"""`recipes/convert.py <recipe> --dry-run`: the recipe's model built from its config on the `meta`
device (no weights, no memory), patched and given its LoRA adapters exactly as training would, then
counted: parameters, what each stage trains, and the memory each process needs.

Memory per process, for each stage (B = bytes per element of the recipe's dtype, P = processes when
the recipe shards with fsdp, else 1):
- weights: every parameter, / P under fsdp, plus one block gathered whole while it runs;
- gradients + AdamW state: 3 x the stage's trainable parameters (grad, exp_avg, exp_avg_sq, all in
  the parameter dtype as torch's AdamW keeps them), / P for the sharded ones (LoRA), whole for the
  patch's own parameters (fsdp keeps them replicated);
- activations, an estimate from what transformers' Llama layer keeps for backward, per token and layer
  (h hidden, i MLP width, kv the key/value width, Hq/Hkv heads, F the patch's feature size, S the
  window + chunk a windowed method scores per query): norms and residuals ~12h, the gated MLP ~5i,
  attention inputs and output ~2h + 4kv, and for a feature-map method 4(Hq + Hkv)F + 3·Hq·S more;
  stage 2 (LoRA, next-token loss) keeps all of it for every layer, plus the logits' share: fp32
  logits, the loss's copies and log-softmax and their gradients (6·b·s·V·4 bytes, as measured); stage 1 (attention transfer: frozen model, per-layer
  losses) keeps only the student's part per layer (the feature-map terms + 3·Hq·d) and one layer's
  working set at a time. With gradient checkpointing a stage keeps only each layer's input (h) and
  recomputes one layer at a time. Checked against the measured peak of a training step on SmolLM2-135M (fp32,
  batch 2 x 512; eval/benchmarks/dry_run_check.py → eval/results/recipes-dry-run/): it errs high for stage 2
  without checkpointing and low for stage 1 (numbers there and in the README).
The weights' total and largest layer come from accelerate's `calculate_maximum_sizes`.
"""

from __future__ import annotations

import torch

from ..api import patch_model
from ..config import PatchConfig
from .config import RecipeConfig, StageConfig


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _feature_size(model, head_dim: int) -> int:
    """Largest feature size among the patch's feature maps (0 when the method has none)."""
    from ..ops.linear import FeatureMap

    return max((m.feature_dim(head_dim) for m in model.modules() if isinstance(m, FeatureMap)), default=0)


def dry_run(config: RecipeConfig, processes: int = 1) -> dict:
    """The recipe's model on `meta`, patched as training would patch it; returns the counts and the
    memory estimate per process (see the module docstring)."""
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoModelForCausalLM

    from ..models import load_model_config
    from .sharding import transformer_blocks
    from .model_setup import DTYPES, is_attnpatch, with_lora

    dtype = DTYPES[config.dtype]
    model_config = load_model_config(config.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    if config.attention is not None:
        patch_model(model, PatchConfig.from_dict(config.attention))
    use_lora = config.stage2.steps > 0 and config.stage2.lora_r > 0
    if use_lora:
        model = with_lora(model, config.stage2, config.seed)
    named = dict(model.named_parameters())
    patch_params = [p for n, p in named.items() if is_attnpatch(n)]
    lora_params = [p for n, p in named.items() if "lora_" in n]
    total_bytes, largest_layer = calculate_maximum_sizes(model)
    blocks = transformer_blocks(model)
    block_bytes = max(_bytes(b.parameters()) for b in blocks)
    shards = processes if config.fsdp.enabled else 1
    text = model_config.get_text_config()
    hidden, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    features = _feature_size(model, head_dim)
    element = torch.finfo(dtype).bits // 8
    weights = total_bytes / shards + (block_bytes if shards > 1 else 0)

    def stage_memory(stage: StageConfig, trainable_sharded: list, trainable_whole: list, activations: float) -> dict:
        optimizer_and_grads = 3 * (_bytes(trainable_sharded) / shards + _bytes(trainable_whole))
        return {"trainable_params": sum(p.numel() for p in trainable_sharded + trainable_whole),
                "weights_gb": weights / 1e9, "grads_and_adam_gb": optimizer_and_grads / 1e9,
                "activations_gb": activations / 1e9,
                "total_gb": (weights + optimizer_and_grads + activations) / 1e9}

    report = {"model": config.model, "dtype": config.dtype, "processes": processes, "fsdp": config.fsdp.enabled,
              "layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads, "vocab": vocab,
              "total_params": sum(p.numel() for p in named.values()), "weights_gb": total_bytes / 1e9,
              "largest_layer_gb": largest_layer[0] / 1e9 if isinstance(largest_layer, tuple) else largest_layer / 1e9,
              "block_gb": block_bytes / 1e9, "patch_params": sum(p.numel() for p in patch_params),
              "lora_params": sum(p.numel() for p in lora_params), "stages": {}}
    seq, s1, s2 = config.data.seq_len, config.stage1, config.stage2
    kv_width = kv_heads * head_dim
    params = (config.attention or {}).get("params", {})
    scored = params.get("window", 0) + params.get("chunk_size", 0) if features else 0
    student = 4 * (heads + kv_heads) * features + 3 * heads * scored + 3 * heads * head_dim
    layer = 12 * hidden + 5 * text.intermediate_size + 2 * hidden + 4 * kv_width  # one layer's saved tensors
    if s1.steps:
        acts = s1.batch_size * seq * element * (layers * student + layer)
        report["stages"]["stage1"] = {"batch_size": s1.batch_size, **stage_memory(s1, [], patch_params, acts)}
    if s2.steps:
        kept = hidden if s2.gradient_checkpointing else layer + student  # per layer until backward
        acts = s2.batch_size * seq * (element * (layers * kept + layer + student) + 6 * vocab * 4)
        whole = patch_params if s2.train_attnpatch else []
        report["stages"]["stage2"] = {"batch_size": s2.batch_size, **stage_memory(s2, lora_params, whole, acts)}
    return report


def format_report(report: dict) -> str:
    lines = [f"dry run: {report['model']} ({report['dtype']}), {report['layers']} layers, hidden {report['hidden']}, "
             f"{report['heads']}/{report['kv_heads']} heads, vocab {report['vocab']}",
             f"  parameters: {report['total_params'] / 1e9:.3f} B ({report['weights_gb']:.2f} GB), largest block "
             f"{report['block_gb']:.2f} GB; the patch adds {report['patch_params']:,}, LoRA {report['lora_params']:,}",
             f"  per process ({report['processes']} process(es), fsdp {'on' if report['fsdp'] else 'off'}):"]
    for name, stage in report["stages"].items():
        lines.append(f"    {name}: trains {stage['trainable_params']:,} parameters; weights {stage['weights_gb']:.2f} GB "
                     f"+ grads/AdamW {stage['grads_and_adam_gb']:.2f} GB + activations ~{stage['activations_gb']:.2f} GB "
                     f"(batch {stage['batch_size']}) = ~{stage['total_gb']:.1f} GB")
    return "\n".join(lines)
