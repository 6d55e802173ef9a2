"""Part 2 of the GPU check: prefill latency and peak memory per length for dense, the attention-free floor
and the sparse and linear methods (both kernels where there are two), and decode tokens/s, steps alternating."""

from __future__ import annotations

import copy

import torch

from eval.common import short_error
from eval.gpu.budget import SKIPPED, Deadline
from eval.common import speed_model

from attnpatch import patch_model, unpatch_model
from attnpatch.config import parse_method_spec
from attnpatch.evaluation.speed import decode_speed_side_by_side, floor_speed, prefill_latency

PREFILL_METHODS = ["linear", "sliding_window", "a_shape", "block_topk", "lolcats"]
# the backends side by side: `auto` is FlexAttention for block_topk on CUDA (a_shape's span path and
# linear's torch path measured faster there) and the torch kernels elsewhere
OTHER_BACKEND = {"cuda": ["a_shape:backend=flex", "block_topk:backend=torch", "linear:backend=fla"],
                 "cpu": ["block_topk:backend=flex"]}
# settings whose speed is the question: block_topk's selection was 163 of its 630 ms per 128k forward on an
# H200 (float32 scores against every query); the mean query scores 64x fewer products
VARIANTS = ["block_topk:query_pooling=mean"]
DECODE_METHODS = ["linear", "lolcats", "snapkv:compression=0.75", "streaming:compression=0.75"]
def speed(device: torch.device, sizes: dict, deadline: Deadline, result: dict, save) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, weights = speed_model()
    model.to(device, dtype).eval()
    result.update({"dtype": str(dtype).removeprefix("torch."), "weights": weights, "prefill": {}, "decode": {},
                   "errors": {}})
    lengths, repeats = sizes["lengths"], sizes["repeats"]
    try:
        floor = floor_speed(model, lengths, sizes["decode_contexts"][0], sizes["new_tokens"], repeats=repeats)
        result["prefill"]["floor"] = floor["prefill"]
        print("prefill floor            " + "  ".join(f"{r['tokens']}: {r['seconds']:.3f} s" for r in floor["prefill"]),
              flush=True)
    except Exception as exc:
        result["errors"]["floor"] = short_error(exc)
    for spec in ["dense"] + PREFILL_METHODS + OTHER_BACKEND.get(device.type, []) + VARIANTS:
        rows = []
        if deadline.passed():
            result["errors"][spec] = SKIPPED
            continue
        try:
            if spec != "dense":
                patch_model(model, parse_method_spec(spec))
            for length in lengths:  # one length at a time: a length that does not fit stops that row only
                rows += prefill_latency(model, [length], repeats=repeats)
        except Exception as exc:
            result["errors"][spec] = short_error(exc)
        finally:
            if spec != "dense":
                unpatch_model(model)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["prefill"][spec] = rows
        save()
        print(f"prefill {spec:<16} " + "  ".join(f"{r['tokens']}: {r['seconds']:.3f} s" for r in rows), flush=True)
    if deadline.passed():
        result["errors"]["decode"] = SKIPPED
        return result
    contenders = {"dense": model, "floor": model}
    for spec in DECODE_METHODS:
        contenders[spec] = patch_model(copy.deepcopy(model), parse_method_spec(spec))
    for context in sizes["decode_contexts"]:
        try:
            rows = decode_speed_side_by_side(contenders, context, sizes["new_tokens"], floor="floor")
            result["decode"][str(context)] = rows
            print(f"decode {context}: " + "  ".join(f"{k} {v['decode_tokens_per_s']:.1f}" for k, v in rows.items()),
                  flush=True)
        except Exception as exc:
            result["errors"][f"decode {context}"] = short_error(exc)
        save()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result
