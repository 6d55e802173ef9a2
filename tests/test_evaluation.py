"""Eval harness on tiny models: perplexity recipes against hand computation, decoding perplexity
through the cache, lm-eval on local tasks end to end, retrieval grids, vision metrics, report."""

import json
import math

import pytest
import tiny_models as tm
import torch

from attnpatch import PatchConfig, PatchError, patch_model
from attnpatch.evaluation import decoding_perplexity, lm_tasks, retrieval, vision, windowed_perplexity
from attnpatch.evaluation.report import EvalSettings, run_grid

TEXT = ("The river runs past the old mill and the town. The mill was built in 1820 by a local family. "
        "It ground wheat for the valley for a hundred years. Later it became a museum of farm tools. "
        "Visitors come every summer to see the great wheel turn. The museum is closed in the winter months. ") * 20


def nll_by_hand(model, ids, begin, end, scored):
    with torch.no_grad():
        logits = model(input_ids=ids[None, begin:end]).logits[0]
    return torch.nn.functional.cross_entropy(logits[-scored - 1:-1], ids[end - scored:end], reduction="sum").item()


def test_windowed_perplexity_follows_the_strided_recipe():
    model = tm.build("llama")
    ids = torch.randint(3, tm.V, (100,), generator=torch.Generator().manual_seed(0))
    res = windowed_perplexity(model, ids, max_length=40, stride=25, progress=False)
    # windows [0,40) scores 39, [25,65) scores 25, [50,90) scores 25, [75,100) scores 10
    expected = nll_by_hand(model, ids, 0, 40, 39) + nll_by_hand(model, ids, 25, 65, 25) + \
        nll_by_hand(model, ids, 50, 90, 25) + nll_by_hand(model, ids, 75, 100, 10)
    assert res.tokens == 99 and res.windows == 4
    assert math.isclose(res.nll, expected / 99, rel_tol=1e-5)
    independent = windowed_perplexity(model, ids, max_length=50, progress=False)
    assert independent.tokens == 98  # two windows of 50 score 49 each


@pytest.mark.parametrize("method", [None, "linear"])
def test_decoding_perplexity_equals_prefill_for_exact_caches(method):
    model = tm.build("llama")
    if method:
        patch_model(model, method)
    ids = torch.randint(3, tm.V, (48,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids[None], use_cache=False).logits[0].float()
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="none")
    for start in (1, 16):
        decoded = decoding_perplexity(model, ids, max_tokens=48, prefill=start, progress=False)
        assert decoded.tokens == 48 - start  # tokens after the prefill
        assert math.isclose(decoded.nll, nll[start - 1:].mean().item(), rel_tol=1e-4)
    # the cache held what it should: dense K/V for 48 tokens, or a constant-size linear state
    cfg = model.config
    dense_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 47 * 16 * 4  # the last token is only a target
    assert (decoded.extra["cache_bytes"] == dense_bytes) == (method is None)
    assert decoded.extra["cache_seq_length"] == 47


def test_local_task_generation():
    items = lm_tasks.make_cloze_items(TEXT, 5)
    assert items and all(len(i["target"]) >= 3 and i["target"].isalpha() for i in items)
    mc = lm_tasks.make_next_sentence_items(TEXT * 3 + " Another day began. Rain fell on the hills again today.", 5)
    assert all(len(i["choices"]) == 4 and 0 <= i["label"] < 4 for i in mc)
    assert lm_tasks._clean("a @-@ b , c ( d )") == "a-b, c (d)"


def test_lm_eval_runs_local_tasks_end_to_end(tmp_path):
    model, tok = tm.build("llama"), tm.tiny_tokenizer()
    # every cloze target is one [UNK] to the tiny vocabulary; [UNK]'s logit raised by 0.51 makes it the greedy
    # choice after some contexts (0.495 below the best) and not others (0.523 below): acc is neither 0 nor 1
    unk = tok.unk_token_id
    model.lm_head.register_forward_hook(lambda module, args, out: out.index_add(
        -1, torch.tensor([unk]), torch.full((*out.shape[:-1], 1), 0.51)))
    folder = lm_tasks.prepare_local_tasks(tmp_path / "tasks", TEXT, count=8)
    assert (folder / "attnpatch_cloze.yaml").read_text().count(str(folder)) == 1
    out = lm_tasks.run_lm_eval(model, tok, list(lm_tasks.LOCAL_TASKS), include_path=folder, limit=8, batch_size=4)
    # acc by hand: the target is right when each of its tokens is the greedy continuation of what precedes it
    docs = [json.loads(line) for line in (folder / "cloze.jsonl").read_text().splitlines()][:8]
    right = 0
    with torch.no_grad():
        for doc in docs:
            context = tok(doc["context"]).input_ids
            whole = tok(doc["context"] + " " + doc["target"]).input_ids
            target = whole[len(context):]
            logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0, len(context) - 1:]
            right += logits.argmax(-1).tolist() == target
    assert 0 < right < len(docs)
    assert out["attnpatch_cloze"]["acc"] == pytest.approx(right / len(docs))
    assert out["attnpatch_next_sentence"]["sample_len"] == 8
    assert set(out["_seconds"]) == set(lm_tasks.LOCAL_TASKS)


def test_committed_lm_eval_tasks_build_their_items_on_first_use():
    """eval/tasks/*.yaml need no preparation: lm-eval calls local_data.py, which builds the same
    seeded items as the generators (from WikiText-2 valid here)."""
    from pathlib import Path

    from attnpatch.evaluation.data import load_text

    folder = Path(__file__).resolve().parents[1] / "eval" / "tasks"
    model, tok = tm.build("llama"), tm.tiny_tokenizer()
    out = lm_tasks.run_lm_eval(model, tok, list(lm_tasks.LOCAL_TASKS), include_path=folder, limit=4, batch_size=4)
    assert out["attnpatch_cloze"]["sample_len"] == 4 and out["attnpatch_next_sentence"]["sample_len"] == 4
    source, _ = load_text(None, "valid")
    built = lm_tasks.task_dataset("attnpatch_cloze")["test"]
    assert len(built) == 200 and built[3] == lm_tasks.make_cloze_items(source, 200, 0)[3]
    with pytest.raises(ValueError, match="known: attnpatch_cloze"):
        lm_tasks.task_dataset("cloze")


class DigitTokenizer:
    """Counts characters as tokens, for checking prompt fitting without a real tokenizer."""

    def __call__(self, text, return_tensors=None):
        class Out:
            input_ids = list(text)
        return Out()


def test_retrieval_prompts_fit_lengths_and_hide_the_answer():
    tok = DigitTokenizer()
    cases = retrieval.make_cases(tok, "passkey", [600, 1200], [0.0, 0.5, 1.0], samples=2, seed=3)
    assert len(cases) == 12
    for case in cases:
        assert len(case.prompt) <= case.length and len(case.prompt) > case.length - 200
        assert case.prompt.count(case.answer) == 2 and case.prompt.endswith("The pass key is")
    early, late = cases[0].prompt.index(cases[0].answer), cases[4].prompt.index(cases[4].answer)
    assert early < 300 < late  # depth 0 near the start, depth 1 near the end
    needle = retrieval.make_cases(tok, "needle", [800], [0.5], haystack_text=TEXT)[0]
    assert needle.answer in needle.prompt and "special magic number" in needle.prompt


def test_retrieval_scoring_reads_the_first_number():
    class Echo:  # "generates" the hidden key for one case and garbage for the other
        def __init__(self, tok):
            self.tok, self.p = tok, torch.nn.Parameter(torch.zeros(1))

        def parameters(self):
            return iter([self.p])

        def generate(self, input_ids, **kw):
            answer = " 12345." if input_ids.shape[1] % 2 else " no idea"
            return torch.cat([input_ids, self.tok(answer, return_tensors="pt").input_ids], dim=1)

    tok = tm.tiny_tokenizer()
    cases = [retrieval.RetrievalCase(f"{tm.word(20)} {tm.word(21)} {tm.word(22)}", "12345", 3, 0.0, "passkey"),
             retrieval.RetrievalCase(f"{tm.word(20)} {tm.word(21)}", "12345", 2, 1.0, "passkey")]
    res = retrieval.evaluate_retrieval(Echo(tok), tok, cases, progress=False)
    assert res.accuracy == 0.5 and res.grid == {2: {1.0: 0.0}, 3: {0.0: 1.0}}


def test_vision_metrics():
    logits = torch.tensor([[2.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    other = torch.tensor([[2.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    out = vision.compare_classifier(logits, other, torch.tensor([0, 1, 1]))
    assert out == {"top1_agreement": pytest.approx(2 / 3), "accuracy": pytest.approx(1 / 3),
                   "dense_accuracy": pytest.approx(2 / 3)}
    dense = torch.ones(4, 4)
    assert vision.compare_dit(dense, dense)["psnr_db"] == float("inf")
    assert vision.compare_dit(dense, dense + 0.1)["psnr_db"] == pytest.approx(20.0)


def test_report_grid_on_tiny_decoder(tmp_path):
    model, tok = tm.build("llama"), tm.tiny_tokenizer()
    text_file = tmp_path / "text.txt"
    text_file.write_text(" ".join(tm.word(14 + (i * 7) % (tm.V - 14)) for i in range(400)))
    settings = EvalSettings(data=str(text_file), ppl_tokens=128, ppl_window=32, decode_tokens=24, decode_prefill=8,
                            lm_eval_limit=4, task_items=4, task_text=str(text_file),
                            retrieval_lengths=[48, 64], retrieval_depths=[0.0, 1.0], speed_lengths=[16, 32],
                            decode_prompt=8, decode_new_tokens=4)
    metrics = ["ppl", "decode_ppl", "passkey", "speed", "sinks"]
    report = run_grid(model, tok, ["sliding_window:window=4,sinks=1", "linear"], metrics, settings, tmp_path / "out",
                      progress=False)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["methods"] == ["dense", "sliding_window:window=4,sinks=1", "linear"]
    assert saved["environment"]["threads"] >= 1 and saved["environment"]["seed"] == 0
    r = report["results"]
    assert r["dense"]["ppl"]["tokens"] == 4 * 31
    assert r["linear"]["decode_ppl"]["cache_bytes"] < r["dense"]["decode_ppl"]["cache_bytes"]
    assert set(r["dense"]["passkey"]["grid"]) == {"48", "64"}  # JSON-ready keys
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Decoding perplexity" in md and "| linear |" in md and "## Time per metric" in md
    assert "## Attention sinks" in md and 0 < r["dense"]["sinks"]["first_token_mass"] < 1
    floor = r["dense"]["speed"]["floor"]  # the attention-free floor, measured beside dense
    assert [row["tokens"] for row in floor["prefill"]] == [16, 32] and floor["decode"]["kv_bytes"] == 0
    assert "| floor (attention-free) |" in md and "method / floor" in md
    assert r["dense"]["sinks"]["heads"] == 12  # 3 layers x 4 heads
    for plot in ("quality_vs_compression.png", "perplexity.png", "latency_vs_length.png", "passkey_heatmap.png",
                 "sinks_dense.png", "sinks_linear.png"):
        assert (tmp_path / "out" / plot).stat().st_size > 1000


def test_report_grid_vision(tmp_path):
    vit = tm.build("vit")
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    classifier = ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=96, image_size=32, patch_size=8,
                                                     num_labels=5)).eval()
    del vit
    inputs = {"pixel_values": tm.pixels(batch=6), "labels": torch.tensor([0, 1, 2, 3, 4, 0])}
    report = run_grid(classifier, None, ["sliding_window:window=4096", "linear"], ["vit"], out_dir=tmp_path,
                      vision_inputs=inputs, progress=False)
    r = report["results"]
    assert r["dense"]["vit"]["top1_agreement"] == 1.0
    assert r["sliding_window:window=4096"]["vit"]["top1_agreement"] == 1.0  # full window is exact
    dit = tm.build("dit")
    g = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(2, 4, 8, 8, generator=g), "timesteps": torch.tensor([900, 100]),
              "conditioning": {"class_labels": torch.tensor([1, 2])}}
    report = run_grid(dit, None, ["linear"], ["dit"], out_dir=tmp_path / "dit", vision_inputs=inputs, progress=False)
    assert report["results"]["dense"]["dit"]["mse"] == 0.0 and report["results"]["linear"]["dit"]["mse"] > 0


def test_report_grid_clip_zero_shot(tmp_path):
    model = tm.build("clip")
    ids, mask = tm.text_batch(batch=3, length=6)
    inputs = {"pixel_values": tm.pixels(batch=4), "input_ids": ids, "attention_mask": mask,
              "labels": torch.tensor([0, 1, 2, 0])}
    report = run_grid(model, None, ["sliding_window:window=4096", "linear"], ["clip"], out_dir=tmp_path,
                      vision_inputs=inputs, progress=False)
    r = report["results"]
    assert r["dense"]["clip"]["zero_shot_agreement"] == 1.0
    assert r["sliding_window:window=4096"]["clip"]["image_embedding_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert r["linear"]["clip"]["image_embedding_cosine"] < 0.9999
    assert "## clip agreement with the dense model" in (tmp_path / "report.md").read_text()


def test_report_grid_llava_and_config_file_specs(tmp_path):
    from attnpatch.evaluation.vision import llava_prompt_inputs

    model = tm.build("llava")
    inputs = {"llava": llava_prompt_inputs(model, batch=2, text_tokens=8)}
    config = tmp_path / "prune.json"
    config.write_text(PatchConfig("visual_token_prune", {"ratio": 0.25}).to_json())
    report = run_grid(model, None, ["visual_token_prune:ratio=1.0", str(config), "var:p=1.0,tau=1.5,dims=0/1/2"],
                      ["llava"], out_dir=tmp_path / "out", vision_inputs=inputs, progress=False)
    r = report["results"]
    assert r["dense"]["llava"]["lm_tokens"] == 8 + 16 and r[str(config)]["llava"]["lm_tokens"] == 8 + 4
    assert r["visual_token_prune:ratio=1.0"]["llava"]["logit_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert r["visual_token_prune:ratio=1.0"]["llava"]["greedy_token_agreement"] == 1.0
    assert r[str(config)]["llava"]["logit_cosine"] < 0.99999
    assert "## llava agreement with the dense model" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(PatchError, match="no such file"):
        run_grid(model, None, [str(tmp_path / "missing.json")], ["llava"], out_dir=tmp_path, vision_inputs=inputs)


def test_offline_text_fallback_is_decided_at_once(tmp_path, monkeypatch):
    """No local WikiText-2 and an unreachable hub: the fallback text comes at once, not after the
    hub clients' retries (~25 s); asking for the hub's WikiText-2 says why it cannot."""
    import time

    import huggingface_hub.constants

    from attnpatch.evaluation.data import load_text
    from attnpatch.models import hub_offline

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ATTNPATCH_DATA", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # refused at once
    hub_offline.cache_clear()
    try:
        start = time.perf_counter()
        text, what = load_text(None, "test")
        assert time.perf_counter() - start < 2.0
        assert "offline and no WikiText-2 found" in what and len(text) > 100_000
        with pytest.raises(FileNotFoundError, match="hub is unreachable"):
            load_text("wikitext2", "test")
    finally:
        hub_offline.cache_clear()


def test_the_floor_is_attention_free_and_restores_the_model():
    """Under attention_free each token's output is its own value: no earlier token changes the last
    token's logits (attention is really off); afterwards the model attends again, and a patched
    model is refused."""
    from attnpatch.evaluation.floor import attention_free, floor_attention

    model = tm.build("llama")
    ids = torch.randint(5, 100, (1, 12))
    other = ids.clone()
    other[0, :6] = torch.randint(5, 100, (6,))
    with attention_free(model):
        last = model(input_ids=ids, use_cache=False).logits[0, -1]
        assert torch.allclose(model(input_ids=other, use_cache=False).logits[0, -1], last, atol=1e-6)
    assert not torch.allclose(model(input_ids=other, use_cache=False).logits[0, -1],
                              model(input_ids=ids, use_cache=False).logits[0, -1], atol=1e-4)
    q, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    out, _ = floor_attention(None, q, v, v, None)
    assert torch.equal(out, v.repeat_interleave(2, 1).transpose(1, 2))  # (B, L, Hq, D): its own value
    patch_model(model, "streaming", budget=8)
    with pytest.raises(ValueError, match="unpatch"):
        with attention_free(model):
            pass


def test_decode_speed_side_by_side_measures_every_contender():
    import copy

    from attnpatch.evaluation.speed import decode_speed_side_by_side

    model = tm.build("llama")
    held = patch_model(copy.deepcopy(model), "streaming", budget=8)
    rows = decode_speed_side_by_side({"dense": model, "floor": model, "streaming": held}, 24, new_tokens=4,
                                     floor="floor")
    assert set(rows) == {"dense", "floor", "streaming"}
    assert rows["floor"]["kv_bytes"] == 0 and 0 < rows["streaming"]["kv_bytes"] < rows["dense"]["kv_bytes"]
    assert all(r["decode_tokens_per_s"] > 0 and r["new_tokens"] == 4 for r in rows.values())


def test_peak_memory_sees_a_short_lived_allocation():
    from attnpatch.evaluation.memory import peak_memory

    with peak_memory() as held:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched, then freed before the block ends
        del block
    assert 60 * 2**20 <= held["bytes"] <= 200 * 2**20
    with peak_memory() as idle:
        pass
    assert idle["bytes"] < 16 * 2**20


def test_report_grid_runs_token_merge_and_attention_reuse_on_vit_clip_and_a_dit_trajectory(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    classifier = ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=96, image_size=32, patch_size=8,
                                                     num_labels=5)).eval()
    report = run_grid(classifier, None, ["token_merge:r=0", "token_merge:r=4"], ["vit"], out_dir=tmp_path / "vit",
                      vision_inputs={"pixel_values": tm.pixels(batch=6)}, progress=False)
    r = report["results"]
    assert r["token_merge:r=0"]["vit"]["top1_agreement"] == 1.0 and r["token_merge:r=4"]["vit"]["images_per_second"] > 0
    clip = tm.build("clip")
    ids, mask = tm.text_batch(batch=3, length=6)
    report = run_grid(clip, None, ["token_merge:r=3"], ["clip"], out_dir=tmp_path / "clip", progress=False,
                      vision_inputs={"pixel_values": tm.pixels(batch=4), "input_ids": ids, "attention_mask": mask})
    merged = report["results"]["token_merge:r=3"]["clip"]
    assert merged["text_embedding_cosine"] > 0.9999 and merged["image_embedding_cosine"] < 0.9999  # images only
    dit = tm.build("dit")
    inputs = {"sample": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), "steps": 8,
              "conditioning": {"class_labels": torch.tensor([1, 2])}}
    report = run_grid(dit, None, ["attention_reuse:self_reuse=0", "attention_reuse", "token_merge"], ["dit"],
                      out_dir=tmp_path / "dit", vision_inputs=inputs, progress=False)
    r = report["results"]
    assert r["attention_reuse:self_reuse=0"]["dit"]["ssim"] == pytest.approx(1.0)  # no reuse: the dense trajectory
    for spec in ("attention_reuse", "token_merge"):
        assert r[spec]["dit"]["ssim"] < 0.999 and r[spec]["dit"]["images_per_second"] > 0


def test_ssim_is_one_for_equal_maps_and_falls_with_noise():
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(2, 3, 16, 16, generator=g).cumsum(-1)  # some structure
    assert vision.ssim(reference, reference) == pytest.approx(1.0)
    noise = torch.randn(reference.shape, generator=g)
    scores = [vision.ssim(reference, reference + level * noise) for level in (0.1, 0.5, 5.0)]
    assert scores[0] > scores[1] > scores[2] and scores[2] < 0.5
