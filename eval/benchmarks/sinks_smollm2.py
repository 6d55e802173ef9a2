"""Attention sinks and massive activations of SmolLM2-135M on WikiText-2 (the sink inspector):

    python eval/benchmarks/sinks_smollm2.py        # ~1 min on 2 CPU cores
Writes eval/results/sinks-smollm2/{sinks.md, sinks.png, sinks.json}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from attnpatch.analysis.sink_inspector import inspect_sinks
from attnpatch.evaluation.data import load_text
from attnpatch.models import load_default_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--out", default="eval/results/sinks-smollm2")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_default_model()
    model.eval()
    ids = tokenizer(load_text(split="valid")[0], return_tensors="pt").input_ids[0]
    batches = [ids[i * args.length:(i + 1) * args.length][None] for i in range(args.sequences)]
    report = inspect_sinks(model, batches)
    report.plot(out / "sinks.png")
    tower = report.towers[0]
    first = report.first_token[tower]
    summary = (f"{args.sequences} WikiText-2 valid sequences of {args.length} tokens (no BOS added: position 0 is "
               f"an ordinary word). Mean attention on the first token over all heads and layers: "
               f"{float(first.mean()):.3f}; heads putting more than half their attention on it: "
               f"{int((first > 0.5).sum())} of {first.numel()}; layers 2 onwards: {float(first[2:].mean()):.3f}. "
               "The last row is after the final norm.")
    first_example = batches[0][0]
    tokens = sorted({p for row in report.sink_positions[tower] for p in row})
    words = ", ".join(f"{p}: {tokenizer.decode(first_example[p:p + 1])!r}" for p in tokens)
    (out / "sinks.md").write_text(f"# Attention sinks in SmolLM2-135M\n\n{summary}\n\n{report.table()}\n\n"
                                  f"Tokens at the other-sink positions of example 0: {words}\n")
    (out / "sinks.json").write_text(json.dumps({
        "first_token": first.tolist(), "other_sinks": report.other_sinks[tower].tolist(),
        "sink_positions": report.sink_positions[tower], "massive": report.massive[tower],
        "examples": report.examples}, indent=1) + "\n")
    print(summary)


if __name__ == "__main__":
    main()
