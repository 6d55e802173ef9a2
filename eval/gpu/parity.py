"""Part 1 of the GPU check: every method of the test matrix on the device against the CPU, in float32
and half precision, and the other kernels (fla, FlexAttention) against the torch paths."""

from __future__ import annotations

import copy
import traceback

import test_matrix as matrix
import tiny_models as tm
import torch

from eval.common import short_error
from eval.gpu.budget import SKIPPED, Deadline

from attnpatch import patch_model, unpatch_model

# float32 on another device: kernels sum in another order (and may use TF32 where allowed)
FLOAT32_TOLERANCE = 2e-3
def parity(device: torch.device, half_dtypes, deadline: Deadline) -> list[dict]:
    dense_error: dict = {}

    def dense_half_error(model_name, dtype):
        if (model_name, dtype) not in dense_error:
            model = tm.build(model_name).to(device)
            reference = matrix.outputs(model, model_name, torch.float32)[0]
            got = matrix.outputs(model.to(dtype), model_name, dtype)[0]
            dense_error[(model_name, dtype)] = matrix.relative_error(got, reference)
        return dense_error[(model_name, dtype)]

    rows = []
    for name, model_name in matrix.method_model_pairs():
        row = {"method": name, "model": model_name, "passed": False}
        if deadline.passed():
            row["error"] = SKIPPED
            rows.append(row)
            continue
        try:
            model = tm.build(model_name)
            matrix.patch(model, name, model_name)
            cpu = matrix.outputs(model, model_name, torch.float32)[0]
            model.to(device)
            on_device = matrix.outputs(model, model_name, torch.float32)[0]
            row["float32_vs_cpu"] = matrix.relative_error(on_device.cpu(), cpu)
            bound = max(FLOAT32_TOLERANCE, matrix.CASES[name].half_precision_tolerance or 0.0)
            failures = [] if row["float32_vs_cpu"] <= bound else [f"float32 {row['float32_vs_cpu']:.2e} > {bound:.0e}"]
            for dtype in half_dtypes:  # each from the float32 weights (not one rounding after another)
                label = str(dtype).removeprefix("torch.")
                got = matrix.outputs(copy.deepcopy(model).to(dtype), model_name, dtype)[0]
                finite = bool(torch.isfinite(got).all())
                error = matrix.relative_error(got, on_device)
                tolerance = (matrix.CASES[name].half_precision_tolerance
                             or matrix.DENSE_ERROR_FACTOR * dense_half_error(model_name, dtype))
                row[label] = {"finite": finite, "error": error, "tolerance": tolerance}
                if not finite:
                    failures.append(f"{label}: NaN or inf")
                elif error > tolerance:
                    failures.append(f"{label} {error:.4f} > {tolerance:.4f}")
            row["passed"], row["failures"] = not failures, failures
        except Exception as exc:  # one broken method must not hide the others
            row["error"] = short_error(exc)
            row["trace"] = traceback.format_exc(limit=6)
        rows.append(row)
        print(f"parity {name:<20} {model_name:<6} {'ok' if row['passed'] else 'FAIL ' + str(row.get('failures') or row.get('error'))}",
              flush=True)
    return rows


# the other backends against the torch path: fla for linear (by name: `auto` is torch), `auto` for the
# block layouts (FlexAttention on CUDA; 64- and 32-token blocks: the kernel tiles that SmolLM2's defaults
# and smaller blocks use)
BACKEND_ROWS = [("linear (hedgehog)", "linear", {"feature_map": "hedgehog"}, "fla"),
                ("linear (elu)", "linear", {"feature_map": "elu"}, "fla"),
                ("a_shape (64-token blocks)", "a_shape", {"block_size": 64}, "auto"),
                ("block_topk (64-token blocks)", "block_topk", {"block_size": 64, "top_k": 3}, "auto"),
                ("bigbird (32-token blocks)", "bigbird", {"block_size": 32}, "auto"),
                ("star (32-token blocks)", "star", {"block_size": 32}, "auto")]
BACKEND_PROMPT, BACKEND_STEPS = 512, 4


def backend_parity(device: torch.device) -> list[dict]:
    """Each row's other backend (flash-linear-attention for linear, `auto` for the block layouts:
    FlexAttention on CUDA) against its torch path on the device: a 512-token prefill of a tiny Llama
    and 4 decoding steps from the cache it left (the matrix's prompts are shorter than one fla chunk or
    kernel tile, so its parity rows run the torch paths). Off a GPU `auto` runs torch, and without
    flash-linear-attention linear's rows test `auto`; the rows say what ran instead of failing."""
    from attnpatch import patched_methods
    from attnpatch.ops.linear_fla import fla_kernel
    from attnpatch.runtime.cache import cache_kwargs
    from transformers import DynamicCache

    rows = []
    total = BACKEND_PROMPT + BACKEND_STEPS
    for label, method, params, other in BACKEND_ROWS:
        row = {"method": label, "passed": False}
        if other == "fla" and (device.type != "cuda" or fla_kernel() is None):
            other = "auto"
        try:
            model = tm.build("llama").to(device)
            ids = torch.randint(3, tm.V - 2, (2, total), generator=torch.Generator().manual_seed(0)).to(device)
            logits, ran = {}, {}
            for backend in ("torch", other):
                patch_model(model, method, backend=backend, **params)
                with torch.no_grad():
                    cache = DynamicCache(config=model.config)
                    out = [model(input_ids=ids[:, :BACKEND_PROMPT], **cache_kwargs(model, cache)).logits]
                    ran[backend] = sorted({m.last_backend for m in patched_methods(model)})
                    out += [model(input_ids=ids[:, t:t + 1], **cache_kwargs(model, cache)).logits
                            for t in range(BACKEND_PROMPT, total)]
                logits[backend] = torch.cat(out, dim=1).float()
                unpatch_model(model)
            row["backend"], row["ran"] = other, ran[other]
            row["error"] = matrix.relative_error(logits[other].cpu(), logits["torch"].cpu())
            row["passed"] = row["error"] <= FLOAT32_TOLERANCE and bool(torch.isfinite(logits[other]).all())
        except Exception as exc:
            row["exception"] = short_error(exc)
        rows.append(row)
        print(f"backends {row['method']:<28} {other} ran {row.get('ran')}: {'ok' if row['passed'] else 'FAIL'} "
              f"{row.get('error', row.get('exception'))}", flush=True)
    return rows
