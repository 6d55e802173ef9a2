"""Trained KV compression (kv_merge, mla) against KV eviction at the same bytes, on SmolLM2-135M.

    python eval/benchmarks/kv_trained_smollm2.py --out eval/results/kv-trained-smollm2

Decoding perplexity as in eval/results/kv-smollm2 (WikiText-2 test, 512 tokens prefilled, then
token by token to 1024 through the cache, tokens after the prefill scored; here over `--segments`
consecutive 1024-token segments, averaged), with the cache's bytes at the end. Rows:
- dense SmolLM2, and every eviction method holding 512 entries per kv head (half the dense cache
  at the end; decode='hold' so the budget holds while decoding), on the base model;
- the dense + LoRA control (recipes/smollm2_dense_lora_control.yaml, run into out/smollm2-dense-lora)
  and every eviction method on it: the fair company of the "+ LoRA" rows;
- kv_merge (3 -> 1 kv heads) and mla after their recipe's stage 1 (compression trained, model
  frozen: comparable with eviction on the base model) and after stage 2 (+ LoRA: comparable with
  the control and eviction on it). mla with keys before RoPE (the default): keys 64 + values 128
  latent dims (half the bytes, plus 3 position columns) and 40 + 88 (a third); with rotated keys
  (the earlier start): rank 96 (half) and 64 (a third) for both.
Writes results.json, report.md and ppl_vs_bytes.png.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from attnpatch import load_patched, patch_model, unpatch_model
from attnpatch.analysis.activation_calibration import calibrate_from_activations, calibrated_methods
from attnpatch.config import PatchConfig
from attnpatch.evaluation.data import load_text
from attnpatch.evaluation.perplexity import decoding_perplexity
from attnpatch.evaluation.report import environment
from attnpatch.models import load_model
from attnpatch.recipes.config import RecipeConfig
from attnpatch.recipes.data import packed_blocks

EVICTION = ("streaming", "h2o", "tova", "snapkv", "pyramidkv", "knorm", "keydiff")  # --eviction picks some
# label -> (recipe, run folder, recipe overrides the run was launched with)
ROTATED = ["attention.params.keys=rotated", "attention.params.value_rank=null",  # the recipe before keys='pre_rope'
           "stage2.train_attnpatch=false", "stage2.attnpatch_lr=null"]
TRAINED = {"kv_merge 3->1": ("recipes/smollm2_kv_merge.yaml", "out/smollm2-kv-merge", []),
           "mla rank 96": ("recipes/smollm2_mla.yaml", "out/smollm2-mla-96-att", ["attention.params.rank=96", *ROTATED]),
           "mla rank 64": ("recipes/smollm2_mla.yaml", "out/smollm2-mla-64-att", ["attention.params.rank=64", *ROTATED]),
           "mla pre-RoPE keys 64 + values 128": ("recipes/smollm2_mla.yaml", "out/smollm2-mla-pre-rope",
                                                  ["stage2.train_attnpatch=false", "stage2.attnpatch_lr=null"]),
           "mla pre-RoPE keys 40 + values 88": ("recipes/smollm2_mla.yaml", "out/smollm2-mla-pre-rope-third",
                                                ["attention.params.rank=40", "attention.params.value_rank=88",
                                                 "stage2.steps=0"]),
           # the recipe as it stands: stage 2 resumed from the 64 + 128 run's stage 1, training the factors beside
           # LoRA at a tenth of its rate
           "mla pre-RoPE keys 64 + values 128, factors also in stage 2": (
               "recipes/smollm2_mla.yaml", "out/smollm2-mla-pre-rope-s2f", [])}
SHARED_STAGE1 = {"mla pre-RoPE keys 64 + values 128, factors also in stage 2"}  # its stage 1 row is the 64 + 128 one
CONTROL = "out/smollm2-dense-lora"  # recipes/smollm2_dense_lora_control.yaml: the same LoRA on the dense model


def stage1_model(recipe: Path, run: Path, overrides: list[str]):
    """The base model with the recipe's patch and the parameters stage 1 trained (no LoRA)."""
    config = RecipeConfig.load(recipe, overrides)
    model, tokenizer = load_model(config.model)
    patch_model(model, PatchConfig.from_dict(config.attention))
    if calibrated_methods(model):  # what calibration fixed besides trained parameters (mla's kept slots): again
        blocks = packed_blocks(tokenizer, config.data.train, config.data, config.data.train_tokens,
                               config.data.hub_train_split)[: config.calibration_blocks]
        calibrate_from_activations(model, blocks.split(max(config.stage1.batch_size, 1)))
    trained = torch.load(run / "stage1" / "checkpoint" / "checkpoint.pt", map_location="cpu", weights_only=False)
    result = model.load_state_dict(trained["trainable"], strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"unexpected keys: {result.unexpected_keys[:4]}")
    return model.eval()


def measure(model, tokenizer, ids: torch.Tensor, segments: int, label: str) -> dict:
    runs = [decoding_perplexity(model, ids[i * 1024:(i + 1) * 1024], 1024, prefill=512, desc=f"{label} {i}",
                                tokenizer=tokenizer) for i in range(segments)]
    nll = sum(r.nll for r in runs) / len(runs)
    return {"label": label, "perplexity": math.exp(nll), "segments": [r.perplexity for r in runs],
            "cache_bytes": runs[0].extra["cache_bytes"], "decode_tokens_per_s": runs[0].extra["decode_tokens_per_s"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="eval/results/kv-trained-smollm2")
    parser.add_argument("--segments", type=int, default=2)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--eviction", nargs="+", default=list(EVICTION), choices=EVICTION)
    parser.add_argument("--trained", nargs="+", default=list(TRAINED), choices=list(TRAINED),
                        help="the trained runs to measure (default: every one whose run folder exists)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    ids = tokenizer(load_text(None, "test")[0], return_tensors="pt").input_ids[0]
    results = {"environment": environment(0), "settings": vars(args), "rows": []}
    earlier = out / "results.json"
    done = {r["label"]: r for r in json.loads(earlier.read_text())["rows"]} if earlier.exists() else {}

    def measured(label: str) -> bool:
        """Rows an earlier run of the same settings measured are kept (a run can be completed later)."""
        if label in done:
            results["rows"].append(done[label])
        return label in done

    def add(row):
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))

    def dense_and_eviction(weights, dense_label: str, kind: str, eviction_kind: str, suffix: str = "") -> None:
        if not measured(dense_label):
            add({**measure(weights, tokenizer, ids, args.segments, dense_label), "kind": kind})
        for method in args.eviction:
            label = f"{method}:budget={args.budget},decode=hold{suffix}"
            if not measured(label):
                patch_model(weights, method, budget=args.budget, decode="hold")
                add({**measure(weights, tokenizer, ids, args.segments, label), "kind": eviction_kind})
                unpatch_model(weights)

    with torch.no_grad():
        dense_and_eviction(model, "dense", "dense", "eviction (base model)")
        control = Path(CONTROL) / "final"
        if control.exists():  # eviction on the same LoRA-tuned weights as the control: fair to "+ LoRA" rows
            tuned = load_patched(control).eval()
            unpatch_model(tuned)  # the control recipe patches `softmax` (exact attention): plain SDPA is the same model
            dense_and_eviction(tuned, "dense + LoRA (control)", "control", "eviction (control)", " on the control")
        for label in args.trained:
            recipe, run, overrides = TRAINED[label]
            run = Path(run)
            if not (run / "stage1" / "checkpoint").exists():
                continue
            if label not in SHARED_STAGE1 and not measured(f"{label} (stage 1)"):
                add({**measure(stage1_model(Path(recipe), run, overrides), tokenizer, ids, args.segments,
                               f"{label} (stage 1)"), "kind": "trained, model frozen"})
            summary = run / "summary.json"
            stages = json.loads(summary.read_text())["stages"] if summary.exists() else {}
            if "stage2" not in stages or measured(f"{label} (+ LoRA)"):  # a run stopped after stage 1, or one without
                continue
            final = load_patched(run / "final").eval()
            add({**measure(final, tokenizer, ids, args.segments, f"{label} (+ LoRA)"), "kind": "trained + LoRA",
                 "recipe_eval_perplexity": math.exp(stages["stage2"]["history"][-1]["eval_lm_loss"])})
    (out / "report.md").write_text(markdown(results))
    plot(results, out / "ppl_vs_bytes.png")
    print(markdown(results))


def markdown(results: dict) -> str:
    dense = results["rows"][0]
    lines = ["# Trained KV compression vs eviction on SmolLM2-135M", "",
             f"{results['environment']['date']} · decoding perplexity: WikiText-2 test, 512 tokens prefilled then "
             f"decoded to 1024, {results['settings']['segments']} segments averaged", "",
             "| method | kind | decode ppl | vs dense | KV bytes at end | vs dense |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['label']} | {r['kind']} | {r['perplexity']:.2f} | {r['perplexity'] / dense['perplexity']:.3f}x "
                     f"| {r['cache_bytes']:,} | {r['cache_bytes'] / dense['cache_bytes']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = results["rows"][0]
    fig, ax = plt.subplots(figsize=(7, 4.4))
    markers = {"dense": "k*", "eviction (base model)": "o", "trained, model frozen": "s", "trained + LoRA": "D",
               "control": "kP", "eviction (control)": "x"}
    for r in results["rows"]:
        ax.plot(r["cache_bytes"] / dense["cache_bytes"], r["perplexity"], markers[r["kind"]], label=r["label"])
    ax.set_xlabel("KV bytes at the end / dense")
    ax.set_ylabel("decoding perplexity (WikiText-2)")
    ax.set_yscale("log")
    from matplotlib.ticker import ScalarFormatter

    ax.yaxis.set_major_formatter(ScalarFormatter())  # plain numbers, not 2 x 10^1, on the log axis
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_title("SmolLM2-135M: trained KV compression vs eviction")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
