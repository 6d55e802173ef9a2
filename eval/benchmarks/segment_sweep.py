"""How large a segment the chunked kernels should take on an accelerator: prefill time and peak memory
of block_topk (block scoring), lolcats (window + linear), sliding_window and the torch linear path on
SmolLM2-135M's architecture for each `DEVICE_SEGMENT_BYTES`, beside the attention-free floor, in one
process; then whether compiled FlexAttention reuses its kernel for other lengths of the same bucket.

    python eval/benchmarks/segment_sweep.py --out $OUT/segments            # a GPU machine, ~2 min on one H200
    python eval/benchmarks/segment_sweep.py --device cpu --quick --out /tmp/s  # the code paths at small sizes

On the CPU the kernels keep their cache-sized segments whatever DEVICE_SEGMENT_BYTES says, so there
the sweep only checks that the script runs. Writes sweep.json and sweep.md into --out after every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # eval.*

from eval.common import FLEX_RECOMPILE_LIMIT, dynamo_counts, speed_model  # noqa: E402

from attnpatch import patch_model, unpatch_model  # noqa: E402
from attnpatch.config import parse_method_spec  # noqa: E402
from attnpatch.evaluation.floor import attention_free  # noqa: E402
from attnpatch.evaluation.speed import best_seconds, prefill_latency, random_ids  # noqa: E402
from attnpatch.ops import segments  # noqa: E402

METHODS = ["block_topk", "lolcats", "sliding_window", "linear:backend=torch"]
SIZES = {"full": {"mib": [4, 16, 64, 256, 1024], "length": 32768, "long": 131072, "long_mib": [64, 256, 1024],
                  "bucket": [30000, 20000]},
         "quick": {"mib": [4, 256], "length": 512, "long": 1024, "long_mib": [256], "bucket": [450]}}


def table(result: dict) -> list[str]:
    lines = [f"# Segment sizes on {result['device']} ({result['dtype']}, {result['weights']})", "",
             "Prefill seconds and peak memory per DEVICE_SEGMENT_BYTES, and the ratio to the floor of the same run.",
             ""]
    for length, rows in result["rows"].items():
        floor = result["floor"].get(length)
        lines += [f"## {length} tokens (floor {floor['seconds']:.3f} s)" if floor else f"## {length} tokens", "",
                  "| method | MiB | seconds | vs floor | peak MB |", "|---|---|---|---|---|"]
        for row in rows:
            ratio = f"{row['seconds'] / floor['seconds']:.2f}x" if floor else ""
            lines.append(f"| {row['method']} | {row['mib']} | {row['seconds']:.3f} | {ratio} | {row['peak_mb']:.0f} |")
        lines.append("")
    if result.get("bucket"):
        lines += ["## FlexAttention buckets (block_topk, first call at each length after the sweep)", "",
                  "| tokens | first call s | graphs compiled by it |", "|---|---|---|"]
        lines += [f"| {r['tokens']} | {r['seconds']:.3f} | {r['new_graphs']} |" for r in result["bucket"]]
    if result["errors"]:
        lines += ["", "Errors: " + "; ".join(f"{k}: {v}" for k, v in result["errors"].items())]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget-s", type=float, default=None, help="skip rows that would start after this")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device, sizes = torch.device(args.device), SIZES["quick" if args.quick else "full"]
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, FLEX_RECOMPILE_LIMIT)
    model, weights = speed_model()
    model.to(device, dtype).eval()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype).removeprefix("torch."), "weights": weights, "floor": {}, "rows": {}, "errors": {}}
    t0 = time.perf_counter()

    def save():
        result["seconds"] = round(time.perf_counter() - t0, 1)
        (args.out / "sweep.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "sweep.md").write_text("\n".join(table(result)) + "\n")

    chosen = segments.DEVICE_SEGMENT_BYTES
    plan = [(sizes["length"], mib) for mib in sizes["mib"]] + [(sizes["long"], mib) for mib in sizes["long_mib"]]
    with torch.no_grad():
        for length in (sizes["length"], sizes["long"]):
            with attention_free(model):
                result["floor"][str(length)] = prefill_latency(model, [length], repeats=2)[0]
        for spec in METHODS:
            patch_model(model, parse_method_spec(spec))
            try:
                for length, mib in plan:
                    if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
                        result["errors"][f"{spec} {length} {mib}"] = "skipped: --budget-s"
                        continue
                    segments.DEVICE_SEGMENT_BYTES = mib * 2**20
                    try:
                        row = prefill_latency(model, [length], repeats=2 if length == sizes["length"] else 1)[0]
                    except Exception as exc:  # a segment too large for the device says so and the sweep goes on
                        result["errors"][f"{spec} {length} {mib}"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                        continue
                    result["rows"].setdefault(str(length), []).append({"method": spec, "mib": mib, **row})
                    print(f"{spec:<22} {length} {mib:>5} MiB {row['seconds']:.3f} s {row['peak_mb']:.0f} MB", flush=True)
                    save()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            finally:
                unpatch_model(model)
        segments.DEVICE_SEGMENT_BYTES = chosen
        patch_model(model, "block_topk")  # compiled at `length` above: other lengths of its bucket reuse it
        result["bucket"] = []
        for length in sizes["bucket"]:
            before = dynamo_counts().get("stats", {}).get("unique_graphs", 0)
            ids = random_ids(model, length, 1).to(device)
            seconds = best_seconds(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), 1, device)
            new = dynamo_counts().get("stats", {}).get("unique_graphs", 0) - before
            result["bucket"].append({"tokens": length, "seconds": seconds, "new_graphs": new})
            print(f"bucket {length}: {seconds:.3f} s, {new} new graphs", flush=True)
        unpatch_model(model)
    save()
    print("\n".join(table(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
