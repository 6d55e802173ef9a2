"""`attention_reuse` for diffusion transformers (Pyramid Attention Broadcast, DiTFastAttn's reuse
across steps): an attention module's output changes little between neighbouring denoising steps,
so within a window of the trajectory each module computes it once and then serves it for the next
`*_reuse` steps, skipping its projections and its attention altogether.

Ranges are per attention type (self: the image tokens among themselves; cross: image to text;
joint: SD3's image+text attention) and per layer (layer_params; `calibrate_reuse` in
analysis/reuse_calibration.py picks them from how much each module's output moves between steps).
PAB's defaults are broadcast ranges 2 (spatial) and 6 (cross) within timesteps [100, 800] of 1000:
here self_reuse=1, cross_reuse=5 (the output serves 1 + reuse steps), joint like self, window
0.1-0.8 of `train_timesteps`. A step is a forward with a new timestep (the timestep the pipeline
passes, from its scheduler); a timestep above the last one starts a new generation (caches cleared);
several calls within one step (separate guidance batches) keep separate caches.
"""

from __future__ import annotations

import torch

from ...errors import PatchError
from ...runtime.exact import exact_attention
from ..base import Method, Paper, ParamSpec

KINDS = ("self", "cross", "joint")


class DenoisingSteps:
    """The step a diffusion transformer is at, from the timestep of each forward."""

    def __init__(self):
        self.step, self.generation, self.timestep = -1, 0, None

    def record(self, module, args, kwargs):
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if timestep is None:
            raise PatchError("attention_reuse needs the timestep of every forward (passed as timestep=...) to tell "
                             "denoising steps apart")
        value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if self.timestep is not None and value > self.timestep:
            self.generation += 1  # the trajectory starts again: a new image
        if value != self.timestep:
            self.step += 1
        self.timestep = value


class AttentionReuse(Method):
    name = "attention_reuse"
    paper = Paper('Real-Time Video Generation with Pyramid Attention Broadcast', 2024, "https://arxiv.org/abs/2408.12588")
    deviations = ()
    family = "sparse"
    summary = ("PAB / DiTFastAttn reuse for diffusion transformers: inside a window of the denoising trajectory each "
               "attention module's output is computed once and served for the next steps (ranges per attention type "
               "and layer), skipping the module.")
    model_kinds = ("diffusion",)
    interventions = frozenset({"attention"})
    params = (
        ParamSpec("self_reuse", int, 1, "steps that reuse a self-attention output after it is computed (0 = never)",
                  low=0),
        ParamSpec("cross_reuse", int, 5, "the same for cross-attention to the text", low=0),
        ParamSpec("joint_reuse", int, 1, "the same for joint image+text attention (SD3)", low=0),
        ParamSpec("window_start", float, 0.1, "reuse only at timesteps from this fraction of train_timesteps",
                  low=0.0, high=1.0),
        ParamSpec("window_end", float, 0.8, "... up to this fraction", low=0.0, high=1.0),
        ParamSpec("train_timesteps", int, 1000, "the scheduler's num_train_timesteps (timesteps' scale)", low=1),
    )

    def __init__(self, site, **params):
        super().__init__(site, **params)
        self.steps = None  # DenoisingSteps, set by finish_patch
        self.kind = "cross" if site.cross else ("joint" if site.joint else "self")
        self.saved = {}  # call index within the step -> (generation, step, signature, output)
        self.step_seen, self.call_in_step = None, 0
        self.reused = 0  # module calls served from a saved output: tests' proof of activity

    @classmethod
    def check_params(cls, params):
        if params.get("window_start", 0.1) > params.get("window_end", 0.8):
            raise PatchError(f"attention_reuse window_start={params['window_start']} is after "
                             f"window_end={params['window_end']}")

    def reuse_steps(self) -> int:
        return self.config[f"{self.kind}_reuse"]

    def attention(self, call):
        return exact_attention(call)

    def in_window(self) -> bool:
        scale = self.config["train_timesteps"]
        return self.config["window_start"] * scale <= self.steps.timestep <= self.config["window_end"] * scale

    def next_call(self) -> int:
        """This module's call index within the current step (0 for its first call in a step)."""
        steps = self.steps
        if steps is None or steps.timestep is None:
            raise PatchError("attention_reuse is not wired to the model's forward (no timestep seen); call the patched "
                             "transformer itself, as a diffusers pipeline does")
        if self.step_seen != (steps.generation, steps.step):
            self.step_seen, self.call_in_step = (steps.generation, steps.step), 0
        index, self.call_in_step = self.call_in_step, self.call_in_step + 1
        return index

    def around_module(self, run, args, kwargs):
        steps, index = self.steps, self.next_call()
        signature = tuple(tuple(a.shape) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        saved = self.saved.get(index)
        if (saved is not None and saved[0] == steps.generation and saved[2] == signature and self.in_window()
                and steps.step - saved[1] <= self.reuse_steps()):
            self.reused += 1
            return saved[3]
        out = run(*args, **kwargs)
        if self.reuse_steps():
            self.saved[index] = (steps.generation, steps.step, signature, out)
        return out

    @classmethod
    def finish_patch(cls, model, adapter, placements):
        steps = DenoisingSteps()
        hook = model.register_forward_pre_hook(steps.record, with_kwargs=True)
        for _, method in placements:
            method.steps = steps

        def undo():
            hook.remove()
            for _, method in placements:
                method.steps, method.saved = None, {}

        return undo
