"""ACT on SmolLM2-135M: choose the heads to calibrate on multiple-choice items built from WikiText-2
*test*, then score held-out items (the local lm-eval tasks, built from WikiText-2 *valid*) with
`attnpatch eval`:

    python eval/benchmarks/act_smollm2.py                       # calibration, ~10 min on 2 CPU cores
    attnpatch eval --methods dense act eval/results/act-smollm2/act_config.json --metrics lm_eval \\
        --out eval/results/act-smollm2/heldout

Writes eval/results/act-smollm2/{act_config.json, calibration.json, calibration.md, effect.png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from attnpatch.analysis.act_calibration import calibrate_act
from attnpatch.evaluation.data import load_text
from attnpatch.evaluation.lm_tasks import make_next_sentence_items
from attnpatch.models import load_default_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100, help="calibration items (WikiText-2 test)")
    parser.add_argument("--beta", type=float, default=0.4)
    parser.add_argument("--alpha", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="eval/results/act-smollm2")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_default_model()
    model.eval()
    text, what = load_text(split="test")
    items = make_next_sentence_items(text, args.items, seed=args.seed)
    t0 = time.perf_counter()
    calibration = calibrate_act(model, tokenizer, items, beta=args.beta, alpha=args.alpha)
    seconds = time.perf_counter() - t0
    calibration.plot(out / "effect.png")
    best = calibration.best
    if best:
        (out / "act_config.json").write_text(calibration.config().to_json(indent=1))
    record = {"calibration_items": len(items), "source": what, "beta": args.beta, "alpha": args.alpha,
              "seconds": seconds, "search": calibration.search, "best_heads": best,
              "helpful_heads": len(calibration.ranked), "effect": calibration.effect.tolist()}
    (out / "calibration.json").write_text(json.dumps(record, indent=1))
    (out / "calibration.md").write_text(
        f"# ACT head search on SmolLM2-135M\n\n{len(items)} next-sentence items from {what}, beta={args.beta}, "
        f"alpha={args.alpha}; {len(calibration.ranked)} of {calibration.effect.numel()} heads have a negative "
        f"first-order effect; {seconds:.0f} s.\n\n{calibration.table()}\n\nchosen: {best} heads\n")
    print(calibration.table())
    print(f"best: {best} heads; {seconds:.0f} s")


if __name__ == "__main__":
    main()
