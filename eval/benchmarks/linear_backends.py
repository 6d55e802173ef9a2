"""linear's prefill on its two GPU backends, torch (chunked matmuls) and fla (flash-linear-attention's
Triton kernel), in one process, alternating: SmolLM2-135M's architecture in bfloat16, last logits only,
per feature map and length; then one training step (forward + backward) of the hedgehog maps. What
`auto` is chosen from (eval/results/gpu/linear_backends.txt).

    python eval/benchmarks/linear_backends.py      # a GPU machine with fla installed, ~3 min on one H200
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: eval.*

from eval.common import speed_model  # noqa: E402

from attnpatch import patch_model, patched_methods, unpatch_model  # noqa: E402
from attnpatch.evaluation.speed import best_seconds, random_ids  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Best of `repeats` synchronised calls after one untimed (kernel compilation, autotuning)."""
    fn()
    return best_seconds(fn, repeats, torch.device("cuda"))


def main() -> None:
    model, _ = speed_model()
    model.to("cuda", torch.bfloat16).eval()
    for feature_map in ("elu", "hedgehog"):
        for length in (2048, 8192, 32768, 131072):
            ids, best = random_ids(model, length, 0).to("cuda"), {}
            for backend in ("fla", "torch", "fla", "torch"):  # alternating: drift hits both
                patch_model(model, "linear", feature_map=feature_map, backend=backend)
                with torch.no_grad():
                    seconds = timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), 2)
                assert {m.last_backend for m in patched_methods(model)} == {backend}
                best[backend] = min(best.get(backend, float("inf")), seconds)
                unpatch_model(model)
            print(f"prefill {feature_map} {length}: fla {best['fla']:.4f} torch {best['torch']:.4f} "
                  f"torch/fla {best['torch'] / best['fla']:.2f}", flush=True)
    for length in (2048, 8192):
        ids, best = random_ids(model, length, 0).to("cuda"), {}
        for backend in ("fla", "torch"):
            patch_model(model, "linear", feature_map="hedgehog", backend=backend)
            model.train()

            def step():
                model(input_ids=ids, use_cache=False, labels=ids).loss.backward()
                model.zero_grad(set_to_none=True)

            torch.cuda.reset_peak_memory_stats()
            best[backend] = (timed(step, 2), torch.cuda.max_memory_allocated() / 2**20)
            model.eval()
            unpatch_model(model)
        print(f"train hedgehog {length}: " + "  ".join(f"{k} {s:.4f} s {mb:.0f} MB" for k, (s, mb) in best.items()),
              flush=True)


if __name__ == "__main__":
    main()
