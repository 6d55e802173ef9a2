"""The recipe under `accelerate launch` with two CPU processes (gloo): one process group, data sharded,
gradients averaged (two processes with batch B follow one process with batch 2B step for step), only
the main process writes, ranks end with identical parameters, and a multi-process run resumes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models as tm
import torch

from attnpatch import load_patched
from attnpatch.recipes.stages import rank_batches, state_digest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(recipe, processes, *extra, config=None):
    config = config or ("multi_cpu.yaml" if processes > 1 else "cpu.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate" / config)]
    if processes > 1:
        cmd += ["--num_processes", str(processes), "--main_process_port", str(free_port())]
    cmd += [str(ROOT / "recipes/convert.py"), str(recipe), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("multiprocess")
    tm.build("llama").save_pretrained(d / "tiny")
    tm.tiny_tokenizer().save_pretrained(d / "tiny")
    text = " ".join(tm.word(14 + ((i * 7) % 11 + (i % 3) * 13) % (tm.V - 14)) for i in range(6000))
    (d / "train.txt").write_text(text)
    (d / "eval.txt").write_text(text[: len(text) // 6])
    (d / "recipe.yaml").write_text(f"""
model: {d / 'tiny'}
attention: {{method: lolcats, params: {{window: 4, chunk_size: 8}}}}
data: {{train: [{d / 'train.txt'}], eval: [{d / 'eval.txt'}], seq_len: 32, train_tokens: 4000, eval_tokens: 256}}
stage1: {{steps: 4, lr: 0.05, batch_size: 2, eval_every: 2, checkpoint_every: 2}}
stage2: {{steps: 6, lr: 0.01, batch_size: 2, eval_every: 3, checkpoint_every: 3}}
""")
    return d


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def losses(record: dict, stage: str) -> list[float]:
    return [h["train_loss"] for h in record["stages"][stage]["history"] if "train_loss" in h]


def test_batches_shard_one_global_order():
    one = rank_batches(50, 4, 1, 0, epoch=3, seed=7)
    two = [rank_batches(50, 2, 2, r, epoch=3, seed=7) for r in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1]) == 12  # 50 // 4; the incomplete global batch is dropped
    for step, batch in enumerate(one):
        assert torch.equal(batch, torch.cat([two[0][step], two[1][step]]))  # ranks split the same global batch
    seen = torch.cat([torch.cat(b) for b in two])
    assert seen.unique().numel() == seen.numel() == 48  # no block twice within an epoch
    assert not torch.equal(torch.cat(one), torch.cat(rank_batches(50, 4, 1, 0, epoch=4, seed=7)))


def test_two_processes_train_as_one_process_with_their_combined_batch(workdir):
    two_out, one_out, single_out = workdir / "two", workdir / "one_x4", workdir / "one_x2"
    log = launch(workdir / "recipe.yaml", 2, "--set", f"output_dir={two_out}")
    launch(workdir / "recipe.yaml", 1, "--set", f"output_dir={one_out}", "--set", "stage1.batch_size=4",
           "--set", "stage2.batch_size=4")
    launch(workdir / "recipe.yaml", 1, "--set", f"output_dir={single_out}", "--set", "stage2.steps=0")
    two, one, single = summary(two_out), summary(one_out), summary(single_out)
    assert two["processes"] == 2 and two["distributed_type"] == "MULTI_CPU" and one["processes"] == 1
    assert log.count("wrote ") == 1 and log.count("eval perplexity: dense") == 1  # the main process speaks
    # per step, two processes consume twice the tokens of one with the same per-process batch
    tokens = lambda s: [h["train_tokens"] for h in s["stages"]["stage1"]["history"] if "train_tokens" in h]
    assert tokens(two) == [2 * t for t in tokens(single)] == [0, 2 * 32 * 2 * 2, 4 * 32 * 2 * 2]  # step x seq_len x batch x processes
    # sharded data + averaged gradients: the same trajectory as one process with batch 2 x 2
    for stage in ("stage1", "stage2"):
        assert losses(two, stage) == pytest.approx(losses(one, stage), rel=1e-4)
        digests = two["stages"][stage]["rank_digests"]
        assert len(digests) == 2 and digests[0] == digests[1]  # identical trained parameters on both ranks
    assert two["stages"]["stage2"]["history"][-1]["eval_lm_loss"] < two["stages"]["stage2"]["history"][0]["eval_lm_loss"]
    # final/ is what the main process held, written once
    assert state_digest(load_patched(two_out / "final")) == two["final_state_digest"]
    assert sorted(p.name for p in two_out.iterdir()) == ["final", "perplexity_vs_tokens.png", "probe.pt", "stage1",
                                                         "stage2", "summary.json"]


def test_a_two_process_run_resumes_where_it_stopped(workdir):
    full, resumed = workdir / "full", workdir / "resumed"
    launch(workdir / "recipe.yaml", 2, "--set", f"output_dir={full}", "--set", "stage2.steps=0")
    launch(workdir / "recipe.yaml", 2, "--set", f"output_dir={resumed}", "--set", "stage1.steps=2",
           "--set", "stage2.steps=0")
    log = launch(workdir / "recipe.yaml", 2, "--set", f"output_dir={resumed}", "--set", "stage2.steps=0")
    assert "stage1: resumed at step 2" in log
    # the resumed run continues the same data order from the same state: the same losses and parameters
    assert losses(summary(resumed), "stage1") == pytest.approx(losses(summary(full), "stage1"), rel=1e-5)
    assert summary(resumed)["stages"]["stage1"]["rank_digests"] == summary(full)["stages"]["stage1"]["rank_digests"]


def test_fully_sharded_training_follows_the_data_parallel_run_and_resumes(workdir):
    """fsdp (torch FSDP2 over gloo): parameters sharded across the two processes, the same trajectory as
    the data-parallel run (both average the same gradients), a sharded checkpoint to resume from, and a
    final/ assembled from the full state dict that reloads to the main process's model."""
    ddp, fsdp, resumed = workdir / "ddp", workdir / "fsdp", workdir / "fsdp_resumed"
    launch(workdir / "recipe.yaml", 2, "--set", f"output_dir={ddp}")
    # the FSDP launch config (8 GPUs there, 2 CPU processes here): the recipe shards, accelerate launches
    log = launch(workdir / "recipe.yaml", 2, "--set", f"output_dir={fsdp}", config="fsdp.yaml")
    assert "fsdp: 3 blocks sharded over 2 processes" in log
    sharded, plain = summary(fsdp), summary(ddp)
    assert sharded["distributed_type"] == "FSDP" and sharded["processes"] == 2
    assert sharded["fsdp"] == {"blocks": 3, "cpu_offload": False, "reshard_after_forward": True}
    assert sharded["dense_eval_perplexity"] == pytest.approx(plain["dense_eval_perplexity"], rel=1e-5)
    assert sharded["untrained_eval_perplexity"] == pytest.approx(plain["untrained_eval_perplexity"], rel=1e-5)
    for stage in ("stage1", "stage2"):
        assert losses(sharded, stage) == pytest.approx(losses(plain, stage), rel=1e-4)
    assert len(list((fsdp / "stage2" / "checkpoint" / "shards").glob("*.distcp"))) == 2  # one shard per process
    model = load_patched(fsdp / "final")
    assert state_digest(model) == sharded["final_state_digest"]
    probe = torch.load(fsdp / "probe.pt")
    with torch.no_grad():
        assert torch.allclose(model.eval()(input_ids=probe["input_ids"], use_cache=False).logits, probe["logits"],
                              atol=1e-6)
    # stop after stage 1's first checkpoint, then resume from the sharded checkpoint
    launch(workdir / "recipe.yaml", 2, "--set", f"output_dir={resumed}", "--set", "fsdp.enabled=true",
           "--set", "stage1.steps=2", "--set", "stage2.steps=0")
    log = launch(workdir / "recipe.yaml", 2, "--set", f"output_dir={resumed}", "--set", "fsdp.enabled=true")
    assert "stage1: resumed at step 2" in log
    for stage in ("stage1", "stage2"):
        assert losses(summary(resumed), stage) == pytest.approx(losses(sharded, stage), rel=1e-5)
