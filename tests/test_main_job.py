"""`attnpatch compare` (the main job): each row measured through the cache it really holds, ratios
to dense from the same run, a checkpoint as a row of its own, the table, JSON and plot written."""

import json

import pytest
import tiny_models as tm
import torch

from attnpatch import patch_model, save_patched
from attnpatch.evaluation.main_job import JobSettings, format_rows, main_job

SMALL = JobSettings(prompt_tokens=48, decode_tokens=16, prefill_tokens=64, repeats=1)


def test_rows_measure_the_cache_each_method_holds():
    model = tm.build("llama")
    ids = torch.randint(3, 90, (200,), generator=torch.Generator().manual_seed(0))
    rows = main_job(model, ids, ["snapkv:compression=0.75", "kv_quant:bits=4,residual=0,sinks=0,group=16",
                                 "sliding_window:window=8,sinks=2"], settings=SMALL)
    by = {r["setting"]: r for r in rows}
    assert list(by)[0] == "dense" and by["dense"]["kv_vs_dense"] == 1.0
    # snapkv keeps a quarter of the 48-token prompt and grows by the 15 tokens fed after it (dense holds 63),
    # plus its layers' position bookkeeping
    assert 27 / 63 < by["snapkv:compression=0.75"]["kv_vs_dense"] < 27 / 63 + 0.05
    assert by["kv_quant:bits=4,residual=0,sinks=0,group=16"]["kv_vs_dense"] < 0.5
    assert by["sliding_window:window=8,sinks=2"]["perplexity"] != by["dense"]["perplexity"]
    assert all(r["prefill_seconds"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows)
    table = format_rows(rows, SMALL)
    assert table.count("\n") == len(rows) + 1 and "16 tokens after 48" in table
    with pytest.raises(ValueError, match="lower --prompt-tokens"):
        main_job(model, ids[:50], [], settings=SMALL)


@pytest.mark.slow
def test_cli_main_job_with_a_checkpoint_row(tmp_path):
    from attnpatch.cli import main
    from attnpatch.models import load_default_model

    model, tokenizer = load_default_model()
    patch_model(model, "sliding_window", window=32, sinks=4)
    save_patched(model, tmp_path / "final")
    tokenizer.save_pretrained(tmp_path / "final")
    out = tmp_path / "report"
    assert main(["compare", "--model", str(tmp_path / "final"), "--methods", "snapkv:compression=0.75",
                 "--prompt-tokens", "96", "--decode-tokens", "16", "--prefill-tokens", "128", "--repeats", "1",
                 "--out", str(out)]) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["setting"] for r in rows][:2] == ["dense", "snapkv:compression=0.75"]
    assert rows[2]["setting"].endswith("/final") and rows[2]["perplexity"] != rows[0]["perplexity"]
    assert rows[1]["kv_vs_dense"] < 0.5 and (out / "compare.png").stat().st_size > 10_000
    assert "| dense |" in (out / "compare.md").read_text()


def test_readme_quotes_the_committed_main_job_results():
    """The README's main-job table is the committed compare.json rendered, so the two cannot drift."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    results = json.loads((root / "eval" / "results" / "main-job" / "compare.json").read_text())
    table = format_rows(results["rows"], JobSettings(**results["settings"]))
    assert table in (root / "README.md").read_text()
