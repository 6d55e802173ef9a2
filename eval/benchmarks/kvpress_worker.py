"""kvpress side of eval/benchmarks/kv_vs_kvpress.py. Runs inside kvpress's own virtual environment (kvpress pins
an older transformers), so it imports nothing from attnpatch.

    python eval/benchmarks/kvpress_worker.py JOB.json OUT.json

JOB.json (written by kv_vs_kvpress.py): the model folder, the prompts as token ids (context and
question), the runs (press name, compression ratio, mode) and the answer length. For each run and
prompt: the context (query-aware: context + question but its last token) is prefilled under the
press, the KV bytes are read from the cache tensors, then the rest of the question is fed at its
true positions (one token at a time: PyramidKV's layers of different lengths break transformers'
multi-token mask) and the answer is decoded greedily. OUT.json: the answer token ids and bytes.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

import kvpress


def make_press(name: str, ratio: float):
    simple = {"streaming": kvpress.StreamingLLMPress, "tova": kvpress.TOVAPress, "knorm": kvpress.KnormPress,
              "keydiff": kvpress.KeyDiffPress, "snapkv": kvpress.SnapKVPress, "pyramidkv": kvpress.PyramidKVPress,
              "expected_attention": kvpress.ExpectedAttentionPress, "kvzip": kvpress.KVzipPress}
    if name == "adakv_expected_attention":
        return kvpress.AdaKVPress(kvpress.ExpectedAttentionPress(compression_ratio=ratio))
    return simple[name](compression_ratio=ratio)


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


@torch.no_grad()
def answer(model, press, context_ids, question_ids, new_tokens: int):
    cache = DynamicCache()
    with press(model) if press is not None else contextlib.nullcontext():
        model.model(input_ids=context_ids, past_key_values=cache)
    held = cache_bytes(cache)
    start = context_ids.shape[1]
    # the question one token at a time (the same arithmetic as one pass): presses that leave layers at
    # different lengths (PyramidKV) break the causal mask transformers builds for a multi-token step
    for i in range(question_ids.shape[1]):
        out = model(input_ids=question_ids[:, i : i + 1], past_key_values=cache,
                    position_ids=torch.tensor([[start + i]]))
    tokens = [int(out.logits[0, -1].argmax())]
    for step in range(new_tokens - 1):
        position = torch.tensor([[start + question_ids.shape[1] + step]])
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, position_ids=position)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens, held


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    torch.set_num_threads(job.get("threads", 1))
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32, attn_implementation="sdpa").eval()
    results = []
    for run in job["runs"]:
        t0 = time.perf_counter()
        for case in job["cases"]:
            context, question = case["context_ids"], case["question_ids"]
            if run["mode"] == "query_aware":  # the question is compressed with the context
                context, question = context + question[:-1], question[-1:]
            press = None if run["press"] == "dense" else make_press(run["press"], run["ratio"])
            tokens, held = answer(model, press, torch.tensor([context]), torch.tensor([question]), job["new_tokens"])
            results.append({**run, "case": case["id"], "tokens": tokens, "kv_bytes": held})
        print(f"kvpress {run['press']} {run['ratio']} {run['mode']}: {time.perf_counter() - t0:.0f} s", flush=True)
        with open(sys.argv[2], "w") as f:  # written after every run: a long job can be followed
            json.dump({"transformers": __import__("transformers").__version__, "kvpress": kvpress.__version__
                       if hasattr(kvpress, "__version__") else "unknown", "results": results}, f)


if __name__ == "__main__":
    main()
