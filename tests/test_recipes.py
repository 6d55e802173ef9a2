"""Conversion recipes through the real `accelerate launch` on a tiny model: both stages lower
their loss, the artifact reloads to identical outputs, runs resume, bad recipes fail clearly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models as tm
import torch

from attnpatch import PatchError, load_patched, patch_model, patched_configs
from attnpatch.recipes.config import RecipeConfig
from attnpatch.registry import get_method

ROOT = Path(__file__).resolve().parents[1]


def words(n, seed):
    return " ".join(tm.word(14 + ((i * 7) % 11 + (i % 3) * 13 + seed) % (tm.V - 14)) for i in range(n))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe")
    tm.build("llama").save_pretrained(d / "tiny")
    tm.tiny_tokenizer().save_pretrained(d / "tiny")
    (d / "train.txt").write_text(words(6000, 0))
    (d / "eval.txt").write_text(words(1000, 5))
    (d / "recipe.yaml").write_text(f"""
model: {d / 'tiny'}
attention: {{method: lolcats, params: {{window: 4, chunk_size: 8}}}}
data: {{train: [{d / 'train.txt'}], eval: [{d / 'eval.txt'}], seq_len: 32, train_tokens: 4000, eval_tokens: 256}}
stage1: {{steps: 8, lr: 0.05, batch_size: 4, eval_every: 4, checkpoint_every: 4, attention_ce: 0.5}}
stage2: {{steps: 6, lr: 0.01, batch_size: 4, eval_every: 3, checkpoint_every: 3}}
output_dir: {d / 'out'}
""")
    return d


def launch(recipe, *extra):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes/accelerate/cpu.yaml"), str(ROOT / "recipes/convert.py"), str(recipe), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_two_stages_lower_their_losses_and_the_artifact_reloads(workdir):
    launch(workdir / "recipe.yaml")
    summary = json.loads((workdir / "out" / "summary.json").read_text())
    for stage in ("stage1", "stage2"):
        record = summary["stages"][stage]
        assert record["eval_loss_last"] < record["eval_loss_first"], (stage, record["history"])
    stage2 = summary["stages"]["stage2"]["history"]
    assert stage2[-1]["eval_lm_loss"] < stage2[0]["eval_lm_loss"]
    assert summary["dense_eval_perplexity"] > 1 and summary["untrained_eval_perplexity"] > 1
    assert (workdir / "out" / "perplexity_vs_tokens.png").stat().st_size > 1000
    model = load_patched(workdir / "out" / "final").eval()
    assert patched_configs(model)[0].method == "lolcats"
    probe = torch.load(workdir / "out" / "probe.pt")
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], use_cache=False).logits
    assert torch.allclose(logits, probe["logits"], atol=1e-6)
    # stage 1 trained the gates away from their initial 0.1
    gate = model.model.layers[0].self_attn.attnpatch_window_gate
    assert not torch.allclose(torch.sigmoid(gate), torch.full_like(gate, 0.1))
    # final/ carries a model card with the recipe's tokens and perplexities
    card = (workdir / "out" / "final" / "README.md").read_text()
    stage2_after = summary["stages"]["stage2"]["eval_perplexity_after"]
    assert "tags:\n- attnpatch\n- lolcats" in card and f"{stage2_after:.2f}" in card
    assert f"| stage2 | {len(stage2) and summary['stages']['stage2']['steps']} | {stage2[-1]['train_tokens']} |" in card


def test_resume_continues_from_the_checkpoint(workdir):
    out = launch(workdir / "recipe.yaml", "--set", "stage1.steps=12", "--set", "stage2.steps=0",
                 "--set", f"output_dir={workdir / 'out'}")
    assert "stage1: resumed at step 8" in out
    summary = json.loads((workdir / "out" / "summary.json").read_text())
    assert summary["stages"]["stage1"]["steps"] == 12
    assert [h["step"] for h in summary["stages"]["stage1"]["history"]][-1] == 12


def test_pruning_recipe_removes_heads_and_lora_recovers(workdir):
    recipe = workdir / "prune.yaml"
    recipe.write_text(f"""
model: {workdir / 'tiny'}
prune: {{ratio: 0.5, score: gradient, balanced: true, calibration_blocks: 4}}
data: {{train: [{workdir / 'train.txt'}], eval: [{workdir / 'eval.txt'}], seq_len: 32, train_tokens: 4000, eval_tokens: 256}}
stage2: {{steps: 6, lr: 0.01, batch_size: 4, eval_every: 3, checkpoint_every: 3}}
output_dir: {workdir / 'pruned'}
""")
    launch(recipe)
    summary = json.loads((workdir / "pruned" / "summary.json").read_text())
    pruning = summary["pruning"]
    assert pruning["heads_removed"] == 6  # one of each 2-head kv group, 3 layers
    assert pruning["params_before"] - pruning["params_after"] == 6 * 2 * 16 * 64
    history = summary["stages"]["stage2"]["history"]
    assert history[-1]["eval_lm_loss"] < history[0]["eval_lm_loss"]
    probe = torch.load(workdir / "pruned" / "probe.pt")
    from transformers import AutoModelForCausalLM

    for model in (load_patched(workdir / "pruned" / "final"),
                  AutoModelForCausalLM.from_pretrained(workdir / "pruned" / "final")):  # plain transformers too
        with torch.no_grad():
            logits = model.eval()(input_ids=probe["input_ids"], use_cache=False).logits
        assert torch.allclose(logits, probe["logits"], atol=1e-5)
        assert model.config.num_attention_heads == 2 and model.model.layers[0].self_attn.q_proj.out_features == 32


def test_gate_only_training_of_gated_attention(workdir):
    recipe = workdir / "gated.yaml"
    recipe.write_text(f"""
model: {workdir / 'tiny'}
attention: {{method: gated}}
data: {{train: [{workdir / 'train.txt'}], eval: [{workdir / 'eval.txt'}], seq_len: 32, train_tokens: 4000, eval_tokens: 256}}
stage2: {{steps: 6, lr: 0.05, batch_size: 4, eval_every: 3, checkpoint_every: 3, lora_r: 0, train_attnpatch: true}}
output_dir: {workdir / 'gated'}
""")
    launch(recipe)
    summary = json.loads((workdir / "gated" / "summary.json").read_text())
    assert abs(summary["untrained_eval_perplexity"] - summary["dense_eval_perplexity"]) < 1e-3  # identity at start
    history = summary["stages"]["stage2"]["history"]
    assert history[-1]["eval_lm_loss"] < history[0]["eval_lm_loss"]
    model = load_patched(workdir / "gated" / "final").eval()
    assert model.model.layers[0].self_attn.attnpatch_gate.weight.abs().sum() > 0  # the gates trained
    probe = torch.load(workdir / "gated" / "probe.pt")
    with torch.no_grad():
        assert torch.allclose(model(input_ids=probe["input_ids"], use_cache=False).logits, probe["logits"], atol=1e-6)
    from attnpatch.models import load_model  # what `attnpatch eval --model .../final` loads: patched again

    reloaded, tokenizer = load_model(str(workdir / "gated" / "final"))
    assert patched_configs(reloaded)[0].method == "gated" and tokenizer is not None
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=probe["input_ids"], use_cache=False).logits, probe["logits"], atol=1e-6)


def run_small_recipe(workdir, name: str, attention: str, stage1: str, stage2: str = "{steps: 0}") -> dict:
    """Write and launch a recipe on the tiny model and data; returns its summary."""
    recipe = workdir / f"{name}.yaml"
    recipe.write_text(f"""
model: {workdir / 'tiny'}
attention: {attention}
data: {{train: [{workdir / 'train.txt'}], eval: [{workdir / 'eval.txt'}], seq_len: 32, train_tokens: 4000, eval_tokens: 256}}
stage1: {stage1}
stage2: {stage2}
output_dir: {workdir / name}
""")
    launch(recipe)
    return json.loads((workdir / name / "summary.json").read_text())


def assert_probe_matches(model, run, atol: float) -> None:
    """The reloaded final/ model gives the logits the run recorded at its end."""
    probe = torch.load(run / "probe.pt")
    with torch.no_grad():
        assert torch.allclose(model.eval()(input_ids=probe["input_ids"], use_cache=False).logits, probe["logits"],
                              atol=atol)


def test_kv_merge_recipe_trains_the_fused_heads_then_lora_and_saves_a_plain_gqa_model(workdir):
    summary = run_small_recipe(workdir, "kv_merge", "{method: kv_merge, params: {kv_heads: 1}}",
                               "{steps: 8, lr: 0.001, batch_size: 4, eval_every: 4, checkpoint_every: 4}",
                               "{steps: 6, lr: 0.01, batch_size: 4, eval_every: 3, checkpoint_every: 3}")
    stage1 = summary["stages"]["stage1"]
    assert stage1["eval_loss_last"] < 0.95 * stage1["eval_loss_first"], stage1["history"]  # distillation loss fell
    history = summary["stages"]["stage2"]["history"]
    assert history[-1]["eval_lm_loss"] < history[0]["eval_lm_loss"]
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(workdir / "kv_merge" / "final")
    assert plain.config.num_key_value_heads == 1 and plain.model.layers[0].self_attn.k_proj.out_features == 16
    assert_probe_matches(plain, workdir / "kv_merge", atol=1e-5)


def test_mla_recipe_distils_the_latent_and_reloads(workdir):
    # init=kv: the plain principal components, which the output-MSE transfer has room to improve on this tiny
    # random model (the attention-weighted start is already within ~3% of what 8 steps reach here)
    summary = run_small_recipe(workdir, "mla", "{method: mla, params: {rank: 8, init: kv}}",
                               "{steps: 8, lr: 0.01, batch_size: 4, eval_every: 4, checkpoint_every: 4}")
    stage1 = summary["stages"]["stage1"]
    assert stage1["eval_loss_last"] < 0.9 * stage1["eval_loss_first"], stage1["history"]
    assert summary["activation_calibration"]["layers"] == 3  # the latent started from 16 blocks' activations
    model = load_patched(workdir / "mla" / "final")
    assert patched_configs(model)[0].method == "mla"
    assert_probe_matches(model, workdir / "mla", atol=1e-6)


def test_seer_gate_recipe_distils_the_gate_with_the_model_frozen(workdir):
    summary = run_small_recipe(workdir, "seer", "{method: seer_gate, params: {block_size: 4, top_k: 1}}",
                               "{steps: 8, lr: 0.002, batch_size: 4, eval_every: 4, checkpoint_every: 4}")
    stage1 = summary["stages"]["stage1"]
    # the KL on held-out blocks fell (a tiny random model's attention is nearly flat, so it falls little
    # here: tests/test_seer_gate.py shows what the gate learns where attention has structure)
    assert stage1["eval_loss_last"] < stage1["eval_loss_first"], stage1["history"]
    assert_probe_matches(load_patched(workdir / "seer" / "final"), workdir / "seer", atol=1e-6)


def test_bad_recipes_fail_clearly(tmp_path):
    base = {"model": "x", "attention": {"method": "lolcats"}, "data": {}}
    with pytest.raises(PatchError, match=r"unknown field\(s\) \['step'\] in 'stage1'"):
        RecipeConfig.from_dict({**base, "stage1": {"step": 3}})
    with pytest.raises(PatchError, match="unknown method 'lolcat'; known methods"):
        RecipeConfig.from_dict({**base, "attention": {"method": "lolcat"}})
    with pytest.raises(PatchError, match=r"missing required field\(s\) \['data'\]"):
        RecipeConfig.from_dict({"model": "x", "attention": {"method": "linear"}})
    with pytest.raises(PatchError, match="give an 'attention' patch, a 'prune' section with a ratio, or both"):
        RecipeConfig.from_dict({"model": "x", "data": {}})


def test_shipped_recipes_parse():
    for path in (ROOT / "recipes").glob("*.yaml"):
        config = RecipeConfig.load(path)
        assert config.stage1.steps + config.stage2.steps > 0  # something trains
        if config.attention is not None and get_method(config.attention["method"]).family == "linearized":
            assert config.stage1.steps > 0  # a linearized model needs attention transfer first


def test_dry_run_counts_what_training_would_build_without_weights(workdir, tmp_path):
    """--dry-run builds the recipe's model on `meta`: its counts equal those of the real model patched
    and given LoRA as training does, and the memory per process follows from them (fsdp divides)."""
    from attnpatch.models import load_model
    from attnpatch.recipes.dry_run import dry_run
    from attnpatch.recipes.model_setup import is_attnpatch, with_lora

    config = RecipeConfig.load(workdir / "recipe.yaml")
    report = dry_run(config, processes=1)
    model, _ = load_model(str(workdir / "tiny"))
    from attnpatch import patch_model
    from attnpatch.config import PatchConfig

    patch_model(model, PatchConfig.from_dict(config.attention))
    model = with_lora(model, config.stage2, config.seed)
    named = dict(model.named_parameters())
    assert report["total_params"] == sum(p.numel() for p in named.values())
    assert report["patch_params"] == sum(p.numel() for n, p in named.items() if is_attnpatch(n)) > 0
    assert report["lora_params"] == sum(p.numel() for n, p in named.items() if "lora_" in n) > 0
    assert report["stages"]["stage1"]["trainable_params"] == report["patch_params"]
    assert report["stages"]["stage2"]["trainable_params"] == report["lora_params"]
    weights = sum(t.numel() * t.element_size() for t in [*named.values(), *model.buffers()])  # accelerate counts buffers
    assert report["stages"]["stage2"]["weights_gb"] == pytest.approx(weights / 1e9)
    config.fsdp.enabled = True
    sharded = dry_run(config, processes=4)
    assert sharded["stages"]["stage2"]["weights_gb"] == pytest.approx((weights / 4) / 1e9 + sharded["block_gb"])
    # the command line: the report, and dry_run.json beside where the run would write
    out = launch(workdir / "recipe.yaml", "--dry-run", "--set", f"output_dir={tmp_path / 'dry'}")
    assert "dry run:" in out and "stage2: trains" in out
    assert json.loads((tmp_path / "dry" / "dry_run.json").read_text())["lora_params"] == report["lora_params"]


def test_dry_run_of_the_large_recipes_from_their_architecture():
    from attnpatch.recipes.dry_run import dry_run

    for recipe, config_dir, total in (("llama3_8b_lolcats.yaml", "llama3-8b", 8.03e9),
                                      ("llama3_70b_lolcats.yaml", "llama3-70b", 70.55e9)):
        config = RecipeConfig.load(ROOT / "recipes" / recipe, [f"model={ROOT / 'recipes/configs' / config_dir}"])
        report = dry_run(config, processes=8)
        base = report["total_params"] - report["patch_params"] - report["lora_params"]
        assert base == pytest.approx(total, rel=2e-3)  # the published sizes: 8.03 B and 70.55 B
        assert report["stages"]["stage2"]["total_gb"] < 80  # fits an 80 GB GPU (70B: sharded over 8)


def test_gradient_checkpointing_recomputes_the_same_training(workdir):
    """stage2.gradient_checkpointing recomputes layers in backward: the same losses as keeping them."""
    runs = {}
    for flag in (False, True):
        out = workdir / f"checkpointing_{flag}"
        launch(workdir / "recipe.yaml", "--set", "stage1.steps=0", "--set", "stage2.steps=3",
               "--set", f"stage2.gradient_checkpointing={str(flag).lower()}", "--set", f"output_dir={out}")
        stage2 = json.loads((out / "summary.json").read_text())["stages"]["stage2"]
        assert stage2["gradient_checkpointing"] is flag  # the model really recomputed (or not)
        runs[flag] = [h["train_loss"] for h in stage2["history"] if "train_loss" in h]
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)


def test_learning_rate_schedules():
    from attnpatch.recipes.config import StageConfig
    from attnpatch.recipes.stages import learning_rate

    constant = StageConfig(steps=10, lr=0.5, warmup_steps=2)
    assert [learning_rate(constant, i) for i in range(4)] == [0.25, 0.5, 0.5, 0.5]
    cosine = StageConfig(steps=10, lr=1.0, lr_schedule="cosine", warmup_steps=2)
    rates = [learning_rate(cosine, i) for i in range(10)]
    assert rates[:3] == [0.5, 1.0, 1.0] and all(a > b for a, b in zip(rates[2:], rates[3:]))
    assert rates[6] == pytest.approx(0.5) and learning_rate(cosine, 10) == pytest.approx(0.0)
    with pytest.raises(PatchError, match="lr_schedule"):
        RecipeConfig.from_dict({"model": "x", "attention": {"method": "linear"}, "data": {},
                                "stage2": {"lr_schedule": "linear"}})


def test_stage2_attnpatch_lr_trains_the_patch_at_its_own_rate(tmp_path):
    """stage2.attnpatch_lr puts the patch's parameters in their own optimizer group: at a rate near zero
    the gates stay where they were while LoRA moves; without it both train at lr."""
    from accelerate import Accelerator

    from attnpatch.recipes.config import StageConfig
    from attnpatch.recipes.model_setup import train_only, with_lora
    from attnpatch.recipes.stages import run_stage

    blocks = torch.randint(3, tm.V - 2, (8, 16), generator=torch.Generator().manual_seed(0))
    moved = {}
    for rate in (None, 1e-12):
        stage = StageConfig(steps=2, lr=0.05, batch_size=2, eval_every=10, checkpoint_every=10, train_attnpatch=True,
                            attnpatch_lr=rate)
        model = tm.build("llama")
        patch_model(model, "gated")
        model = with_lora(model, stage, seed=0)
        train_only(model, "stage2", stage)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        run_stage("stage2", model, stage, blocks, blocks[:2], Accelerator(cpu=True), tmp_path / str(rate), seed=0)
        change = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters() if n in before}
        moved[rate] = (max(v for n, v in change.items() if "attnpatch_" in n),
                       max(v for n, v in change.items() if "lora_" in n))
    assert moved[None][0] > 1e-3 and moved[None][1] > 1e-3
    assert moved[1e-12][0] < 1e-9 and moved[1e-12][1] > 1e-3
    for stage2, match in (({"attnpatch_lr": 0.001}, "needs stage2.train_attnpatch"),
                          ({"attnpatch_lr": 0.0, "train_attnpatch": True}, "must be > 0")):
        with pytest.raises(PatchError, match=match):
            RecipeConfig.from_dict({"model": "x", "attention": {"method": "gated"}, "data": {}, "stage2": stage2})
    with pytest.raises(PatchError, match="stage1.lr, not stage1.attnpatch_lr"):
        RecipeConfig.from_dict({"model": "x", "attention": {"method": "gated"}, "data": {},
                                "stage1": {"attnpatch_lr": 0.001}})
