"""attention_reuse: reuse 0 is the dense model step for step; inside the window each module runs
once per 1 + reuse steps and the skipped steps get exactly the output it last computed; outside
the window and in a new generation everything runs; calibration picks longer ranges for modules
whose output moves less."""

import pytest
import tiny_models as tm
import torch

from attnpatch import PatchError, patch_model, patched_methods, unpatch_model
from attnpatch.analysis.reuse_calibration import calibrate_reuse
from method_cases import MatrixCase

# one forward is one denoising step, which computes attention: reuse starts at the next step (tested here)
MATRIX_CASES = {"attention_reuse": MatrixCase(["dit"], lossy=False)}

TIMESTEPS = [700, 600, 500, 400, 300, 200]  # all inside PAB's window (100-800 of 1000)


def denoise(name, model, timesteps=TIMESTEPS, seed=0):
    """A fixed sequence of forwards, one per timestep, on the same inputs (what a sampler does, minus the update)."""
    g = torch.Generator().manual_seed(seed)
    sample, text, pooled = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 24, generator=g), torch.randn(2, 16, generator=g)
    outs = []
    with torch.no_grad():
        for t in timesteps:
            t = torch.tensor([t, t])
            if name == "dit":
                out = model(sample, timestep=t, class_labels=torch.tensor([1, 2])).sample
            elif name == "pixart":
                out = model(sample, encoder_hidden_states=text, timestep=t,
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            else:
                out = model(sample, encoder_hidden_states=text, pooled_projections=pooled, timestep=t).sample
            outs.append(out)
            sample = sample - 0.1 * out  # the next step sees a new latent
    return outs


def module_runs(model):
    """Count each patched module's real runs (its processor called through)."""
    runs = {}
    for method in patched_methods(model):
        runs[method.site.path] = 0

        def counting(run, args, kwargs, around=method.around_module, path=method.site.path):
            def counted(*a, **k):
                runs[path] += 1
                return run(*a, **k)
            return around(counted, args, kwargs)
        method.around_module = counting
    return runs


@pytest.mark.parametrize("name", ["dit", "pixart", "sd3"])
def test_no_reuse_is_the_dense_model_and_unpatch_restores(name):
    model = tm.build(name)
    dense = denoise(name, model)
    patch_model(model, "attention_reuse", self_reuse=0, cross_reuse=0, joint_reuse=0, include_cross_attention=True)
    assert all(torch.equal(a, b) for a, b in zip(denoise(name, model), dense))
    unpatch_model(model)
    patch_model(model, "attention_reuse", include_cross_attention=True)
    reused = denoise(name, model)
    assert torch.equal(reused[0], dense[0]) and not torch.equal(reused[1], dense[1])
    assert all(m.reused > 0 for m in patched_methods(model))
    unpatch_model(model)
    assert all(torch.equal(a, b) for a, b in zip(denoise(name, model), dense))


def test_each_module_runs_once_per_range_and_reused_steps_get_its_last_output():
    model = tm.build("pixart")  # self-attention (attn1) and cross-attention (attn2) in every block
    patch_model(model, "attention_reuse", self_reuse=1, cross_reuse=2, include_cross_attention=True)
    runs = module_runs(model)
    outputs = {}
    for method in patched_methods(model):
        method.site.module.register_forward_hook(
            lambda mod, args, out, path=method.site.path: outputs.setdefault(path, []).append(out.clone()))
    denoise("pixart", model)
    for method in patched_methods(model):
        path, seen = method.site.path, outputs[method.site.path]
        if method.kind == "self":  # steps 0, 2, 4 computed; 1, 3, 5 reuse the step before
            assert runs[path] == 3 and all(torch.equal(seen[i], seen[i - 1]) for i in (1, 3, 5))
            assert not torch.equal(seen[2], seen[1])
        else:  # cross: steps 0 and 3 computed
            assert method.kind == "cross" and runs[path] == 2
            assert all(torch.equal(seen[i], seen[0]) for i in (1, 2)) and not torch.equal(seen[3], seen[2])


def test_outside_the_window_and_a_new_generation_run_everything():
    model = tm.build("dit")
    patch_model(model, "attention_reuse", self_reuse=3)
    runs = module_runs(model)
    denoise("dit", model, timesteps=[990, 950, 900, 60, 40, 20])  # all outside 100-800
    assert set(runs.values()) == {6}
    runs.update(dict.fromkeys(runs, 0))
    denoise("dit", model, timesteps=[700, 600, 700, 600])  # 700 after 600: a new image starts, nothing carried over
    assert set(runs.values()) == {2}


def test_calibration_gives_longer_ranges_where_outputs_move_less():
    model = tm.build("pixart")
    patch_model(model, "attention_reuse", include_cross_attention=True)
    # the cross-attention reads the same text every step and barely moves; the self-attention follows the latent
    result = calibrate_reuse(model, lambda: denoise("pixart", model), threshold=0.05, max_reuse=5)
    changes = result["changes"]
    assert set(changes) == {m.site.path for m in patched_methods(model)}
    params = result["layer_params"]
    assert set(params) == {0, 1} and all(set(p) == {"self_reuse", "cross_reuse"} for p in params.values())
    for layer, chosen in params.items():
        assert chosen["cross_reuse"] >= chosen["self_reuse"]
        assert changes[f"transformer_blocks.{layer}.attn2"] < changes[f"transformer_blocks.{layer}.attn1"] / 10
    assert all(m.reused == 0 for m in patched_methods(model))  # calibration itself reuses nothing


def test_errors():
    with pytest.raises(PatchError, match="diffusion"):
        patch_model(tm.build("vit"), "attention_reuse")
    with pytest.raises(PatchError, match="window_start"):
        patch_model(tm.build("dit"), "attention_reuse", window_start=0.9, window_end=0.2)
