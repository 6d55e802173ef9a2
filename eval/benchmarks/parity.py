"""Parity of attnpatch's exact `softmax` method with each model's own eager attention, per adapter.

    python eval/benchmarks/parity.py  ->  eval/results/parity.json and a table on stdout

Uses the tiny random models of the test suite (tests/tiny_models.py); left-padded batches for
decoders, positions that are padding excluded (their outputs are unused by definition).
"""

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import tiny_models as tm  # noqa: E402

from attnpatch import patch_model, unpatch_model  # noqa: E402


def main():
    rows = []
    for name in tm.ALL_MODELS:
        model = tm.build(name)
        pad = 4 if name in tm.DECODERS else 0
        kwargs = {"left_pad": pad} if pad else {}
        if name in tm.DIFFUSERS:
            reference = tm.run(name, model)  # diffusers' default processors (SDPA)
        else:
            model.set_attn_implementation("eager")
            reference = tm.run(name, model, **kwargs)
            model.set_attn_implementation("sdpa" if name != "gemma2" else "eager")
        before = tm.run(name, model, **kwargs)
        patch_model(model, "softmax")
        patched = tm.run(name, model, **kwargs)
        unpatch_model(model)
        restored = torch.equal(tm.run(name, model, **kwargs), before)
        if pad:
            real = tm.text_batch(left_pad=pad)[1].bool()
            patched, reference = patched[real], reference[real]
        err = (patched - reference).abs().max().item()
        rows.append({"model": name, "reference": "diffusers SDPA processor" if name in tm.DIFFUSERS else "eager",
                     "max_abs_error": err, "unpatch_bitwise_identical": restored, "left_padded": bool(pad)})
        print(f"{name:<8} max |softmax - {rows[-1]['reference']}| = {err:.2e}   unpatch identical: {restored}")
    out = ROOT / "eval" / "results" / "parity.json"
    out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
