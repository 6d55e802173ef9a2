"""Public API: bad input, stacking rules, failed-patch rollback, PatchConfig, save/load, CLI."""

import json

import pytest
import tiny_models as tm
import torch
from torch import nn

from attnpatch import (
    Method,
    PatchConfig,
    PatchError,
    UnsupportedModelError,
    is_patched,
    list_methods,
    load_patched,
    patch_model,
    patched_configs,
    register_method,
    save_patched,
    trainable_parameters,
    unpatch_model,
)
from method_cases import MatrixCase

MATRIX_CASES = {"softmax": MatrixCase(["llama", "vit"], lossy=False)}  # exact attention: the unpatched output


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_unknown_method_lists_known():
    with pytest.raises(PatchError, match=r"unknown method 'lineer'; known methods: .*linear.*sliding_window.*softmax"):
        patch_model(tm.build("llama"), "lineer")


def test_out_of_range_and_unknown_params_name_the_fix():
    model = tm.build("llama")
    with pytest.raises(PatchError, match=r"'window' of method 'sliding_window' is 0, out of range: int in \[1, inf\)"):
        patch_model(model, "sliding_window", window=0)
    with pytest.raises(PatchError, match=r"one of 'elu', 'relu', 'performer', 'hedgehog', 'taylor'"):
        patch_model(model, "linear", feature_map="cosine")
    with pytest.raises(PatchError, match=r"has no parameter\(s\) \['windw'\]; its parameters: window, sinks"):
        patch_model(model, "sliding_window", windw=3)
    with pytest.raises(PatchError, match="must be an integer"):
        patch_model(model, "sliding_window", window="big")
    with pytest.raises(PatchError, match=r"layer 7 is out of range for model.layers, which has 3 layers"):
        patch_model(model, "linear", layers=[7])
    with pytest.raises(PatchError, match="matches no attention stack; this model has"):
        patch_model(model, "linear", towers=["vision"])
    assert not is_patched(model)


def test_unsupported_model_names_supported_families():
    with pytest.raises(UnsupportedModelError, match="Supported families: transformers decoders: Llama"):
        patch_model(nn.Sequential(nn.Linear(4, 4)), "linear")
    from transformers import ResNetConfig, ResNetModel

    resnet = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic"))
    with pytest.raises(UnsupportedModelError, match="none of its modules routes attention"):
        patch_model(resnet, "linear")


def test_patch_twice_is_refused_but_disjoint_layers_stack():
    model = tm.build("llama")
    patch_model(model, "linear", layers=[0])
    with pytest.raises(PatchError, match=r"model.layers\[0\] is already patched with \['linear'\] \(attention\)"):
        patch_model(model, "sliding_window")
    patch_model(model, "sliding_window", window=4, layers=[1, 2])  # other layers: allowed
    assert [c.method for c in patched_configs(model)] == ["linear", "sliding_window"]
    unpatch_model(model)
    assert not is_patched(model)


def test_failed_patch_leaves_model_untouched():
    calls = []

    @register_method
    class FailsOnSecondLayer(Method):
        name = "_test_fails_midway"
        family = "test"
        summary = "adds a parameter, then fails on layer 1"

        def attach(self, module):
            calls.append(self.site.layer)
            module.attnpatch_gate = nn.Linear(2, 2)
            if self.site.layer == 1:
                raise RuntimeError("boom")

    model = tm.build("llama")
    before_out, before_state = tm.run("llama", model), snapshot(model)
    configs = [layer.self_attn.config for layer in model.model.layers]
    with pytest.raises(RuntimeError, match="boom"):
        patch_model(model, "_test_fails_midway")
    assert calls == [0, 1]
    assert not is_patched(model)
    assert list(model.state_dict()) == list(before_state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before_state.items())
    assert [layer.self_attn.config for layer in model.model.layers] == configs
    assert all(not any(k.startswith("_attnpatch") for k in layer.self_attn.__dict__) for layer in model.model.layers)
    assert torch.equal(tm.run("llama", model), before_out)


def test_patch_config_json_round_trip_and_validation():
    config = PatchConfig("sliding_window", {"window": 64}, layers=[0, -1], layer_params={0: {"sinks": 4}},
                         towers=["language_model"]).validated()
    assert config.params == {"window": 64, "sinks": 0, "block_size": 64}
    again = PatchConfig.from_json(config.to_json())
    assert again == config
    assert json.loads(config.to_json())["layer_params"] == {"0": {"sinks": 4}}
    with pytest.raises(PatchError, match="overrides layer 2, which layers=\\[0, -1\\] does not select"):
        PatchConfig("linear", layers=[0, -1], layer_params={2: {"chunk_size": 8}}).validated()
    with pytest.raises(PatchError, match="unknown patch config field"):
        PatchConfig.from_dict({"method": "linear", "layer": 3})
    with pytest.raises(PatchError, match="only applies to feature_map='performer'"):
        PatchConfig("linear", {"num_features": 8}).validated()


def test_list_methods_describes_everything():
    methods = {m.name: m for m in list_methods()}
    assert {"softmax", "linear", "sliding_window"} <= set(methods)
    linear = methods["linear"]
    assert linear.family == "linearized" and linear.trainable and "decoder" in linear.model_kinds
    window = next(p for p in methods["sliding_window"].params if p["name"] == "window")
    assert window == {"name": "window", "type": "int", "default": 256, "range": "int in [1, inf)",
                      "help": "keys in the local window"}


def test_saved_checkpoint_has_a_model_card(tmp_path):
    import yaml

    model = tm.build("llama")
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M"
    patch_model(model, PatchConfig("sliding_window", {"window": 16}, layer_params={1: {"window": 8}}))
    save_patched(model, tmp_path / "ckpt", results={"wikitext2 perplexity": 12.3456})
    card = (tmp_path / "ckpt" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header == {"library_name": "transformers", "base_model": "HuggingFaceTB/SmolLM2-135M",
                      "tags": ["attnpatch", "sliding_window", "attention-sparse"]}
    assert "| `sliding_window` | sparse | all | window=16," in card and "| ↳ layer 1 | | 1 | window=8 |" in card
    assert 'load_patched("PATH_OR_REPO")' in card and "| wikitext2 perplexity | 12.35 |" in card
    local = tm.build("llama")
    local.config._name_or_path = str(tmp_path)  # a local folder is not a hub id: no base_model line
    patch_model(local, "linear")
    save_patched(local, tmp_path / "local")
    assert "base_model" not in (tmp_path / "local" / "README.md").read_text()


@pytest.mark.parametrize("name,method,params", [
    ("llama", "linear", {"feature_map": "hedgehog"}), ("llama", "linear", {"feature_map": "performer"}),
    ("dit", "linear", {"feature_map": "hedgehog"}), ("clip", "linear", {"feature_map": "elu"}),
    ("llama", "lolcats", {"window": 3})])
def test_save_load_round_trip(tmp_path, name, method, params):
    from safetensors import safe_open

    model = tm.build(name)
    patch_model(model, method, **params)
    with torch.no_grad():  # move trained parameters away from their init so the test can fail
        for p in trainable_parameters(model).values():
            p.add_(0.05 * torch.randn_like(p))
    expected = tm.run(name, model)
    save_patched(model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "attnpatch_config.json").exists()
    for weights in (tmp_path / "ckpt").rglob("*.safetensors"):  # the base checkpoint holds base weights only
        if weights.name != "attnpatch_params.safetensors":
            with safe_open(str(weights), "pt") as f:
                assert not [k for k in f.keys() if "attnpatch" in k], weights
    reloaded = load_patched(tmp_path / "ckpt").eval()
    assert torch.equal(tm.run(name, reloaded), expected)
    assert [c.to_dict() for c in patched_configs(reloaded)] == [c.to_dict() for c in patched_configs(model)]
    if name in tm.DIFFUSERS:
        return
    # the checkpoint itself is a plain HF checkpoint: plain transformers loads it, unpatched
    plain = type(model).from_pretrained(tmp_path / "ckpt").eval()
    unpatch_model(model)
    assert not any("attnpatch" in k for k in plain.state_dict())
    assert torch.equal(tm.run(name, plain), tm.run(name, model))


def test_hedgehog_parameters_train_and_base_is_untouched():
    model = tm.build("llama")
    patch_model(model, "linear", feature_map="hedgehog")
    params = trainable_parameters(model)
    assert len(params) == 4 * 3  # q and k maps (weight, bias) in 3 layers
    assert all(k.startswith("model.layers.") and ".self_attn.attnpatch_feature_map_" in k for k in params)
    ids, _ = tm.text_batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())


def test_cli_list_and_patch(tmp_path, capsys):
    from attnpatch.cli import main

    assert main(["list"]) == 0
    assert "sliding_window" in capsys.readouterr().out
    model = tm.build("llama")
    model.save_pretrained(tmp_path / "tiny")
    assert main(["patch", "--model", str(tmp_path / "tiny"), "--method", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "known methods" in capsys.readouterr().err
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
                            ).save_pretrained(tmp_path / "tiny")
    assert main(["patch", "--model", str(tmp_path / "tiny"), "--method", "sliding_window", "--param", "window=4",
                 "--param", "sinks=1", "--out", str(tmp_path / "out")]) == 0
    reloaded = load_patched(tmp_path / "out")
    assert patched_configs(reloaded)[0].params["window"] == 4


def test_cli_compare_main_job_on_tiny_model(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from attnpatch.cli import main

    words = {f"w{i}": i for i in range(tm.V)}
    words["[UNK]"] = 1
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tm.build("llama").save_pretrained(tmp_path / "tiny")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % tm.V}" for i in range(300)))
    rc = main(["compare", "--model", str(tmp_path / "tiny"), "--data", str(text), "--prompt-tokens", "48",
               "--decode-tokens", "16", "--prefill-tokens", "64", "--repeats", "1", "--out", str(tmp_path / "job"),
               "--methods", "sliding_window:window=4,sinks=1", "linear"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| sliding_window:window=4,sinks=1 |" in out and "compare.png" in out
    rows = json.loads((tmp_path / "job" / "compare.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["dense", "sliding_window:window=4,sinks=1", "linear"]
    assert rows[0]["decode_speedup"] == 1.0 and rows[0]["kv_vs_dense"] == 1.0
    assert rows[2]["kv_vs_dense"] < 0.5  # linear keeps a state, not 63 tokens of keys and values
    assert len({round(r["perplexity"], 6) for r in rows}) == 3  # the methods really differ


def test_registering_a_name_twice_is_an_error_and_unregister_removes_it():
    from attnpatch import list_methods, unregister_method

    class First(Method):
        name, family, summary = "_test_twice", "test", "first"

    class Second(Method):
        name, family, summary = "_test_twice", "test", "second"

    register_method(First)
    assert register_method(First) is First  # the same class again is harmless
    with pytest.raises(PatchError, match=r"already registered by .*First.*unregister_method\('_test_twice'\)"):
        register_method(Second)
    with pytest.raises(PatchError, match="already registered"):
        register_method(type("Shadow", (Method,), {"name": "linear", "family": "x", "summary": "x"}))
    assert unregister_method("_test_twice") is First
    assert "_test_twice" not in [m.name for m in list_methods()]
    with pytest.raises(PatchError, match="built-in"):
        unregister_method("linear")
    with pytest.raises(PatchError, match="no method '_nope'"):
        unregister_method("_nope")
    assert not [m.name for m in list_methods() if m.name.startswith("_") or m.family == "test"]
