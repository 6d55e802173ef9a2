"""Where block_topk's and lolcats' prefill time goes on a device: two timed forwards, then one under
torch.profiler, tables by host and device time (SmolLM2-135M's architecture, bfloat16 on CUDA).

    python eval/benchmarks/profile_prefill.py 32768 > eval/results/gpu/profile_prefill_32k.txt
"""

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: eval.*

from eval.common import speed_model  # noqa: E402

from attnpatch import patch_model, unpatch_model  # noqa: E402
from attnpatch.evaluation.speed import random_ids  # noqa: E402


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    length = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model, _ = speed_model()
    model.to(device, torch.bfloat16 if device == "cuda" else torch.float32).eval()
    ids = random_ids(model, length, 0).to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for spec in ("block_topk", "lolcats"):
        patch_model(model, spec)
        with torch.no_grad():
            for _ in range(2):  # the first compiles FlexAttention's kernel for this length's bucket
                sync()
                t0 = time.perf_counter()
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                sync()
                print(f"== {spec} {length}: {time.perf_counter() - t0:.3f} s", flush=True)
            with profile(activities=activities) as prof:
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                sync()
        for key in ("self_cpu_time_total", "self_cuda_time_total" if device == "cuda" else "cpu_time_total"):
            print(prof.key_averages().table(sort_by=key, row_limit=16, max_name_column_width=45), flush=True)
        unpatch_model(model)


if __name__ == "__main__":
    main()
