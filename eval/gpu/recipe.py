"""Part 3 of the GPU check: a two-stage LoLCATs conversion of a tiny Llama through `accelerate launch`."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tiny_models as tm
import torch

from eval.common import ROOT

def recipe(device: torch.device, quick: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix="attnpatch-gpu-check-"))
    tm.build("llama").save_pretrained(work / "tiny")
    tm.tiny_tokenizer().save_pretrained(work / "tiny")
    text = " ".join(tm.word(14 + ((i * 7) % 11 + (i % 3) * 13) % (tm.V - 14)) for i in range(6000))
    (work / "train.txt").write_text(text)
    (work / "eval.txt").write_text(text[: len(text) // 6])
    steps = 4 if quick else 20
    (work / "recipe.yaml").write_text(f"""
model: {work / 'tiny'}
attention: {{method: lolcats, params: {{window: 4, chunk_size: 8}}}}
data: {{train: [{work / 'train.txt'}], eval: [{work / 'eval.txt'}], seq_len: 32, train_tokens: 4000, eval_tokens: 256}}
stage1: {{steps: {steps}, lr: 0.05, batch_size: 4, eval_every: {steps}, attention_ce: 0.5}}
stage2: {{steps: {steps}, lr: 0.01, batch_size: 4, eval_every: {steps}}}
output_dir: {work / 'out'}
""")
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    launch += (["--config_file", str(ROOT / "recipes/accelerate/cpu.yaml")] if device.type == "cpu"
               else ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"])
    t0 = time.perf_counter()
    done = subprocess.run(launch + [str(ROOT / "recipes/convert.py"), str(work / "recipe.yaml")], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    final = work / "out" / "final"
    result = {"returncode": done.returncode, "seconds": time.perf_counter() - t0, "final_written": final.exists(),
              "log_tail": (done.stdout + done.stderr)[-1500:]}
    result["passed"] = done.returncode == 0 and result["final_written"]
    print(f"recipe: rc {done.returncode}, final/ {'written' if result['final_written'] else 'MISSING'}, "
          f"{result['seconds']:.0f} s", flush=True)
    return result
