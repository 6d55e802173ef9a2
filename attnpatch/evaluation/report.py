"""The before-vs-after grid: every method setting x every metric, dense always measured in the same
run, written as results.json (with versions, hardware, threads, seed), report.md and plots."""

from __future__ import annotations

import datetime
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..api import patch_model, unpatch_model
from ..api.patching import patched_configs
from ..config import parse_method_spec
from . import lm_tasks, retrieval, speed, vision
from .data import load_text
from .perplexity import decoding_perplexity, windowed_perplexity
from .report_markdown import VISION_METRICS, render_markdown
from .report_plots import make_plots

TEXT_METRICS = ("ppl", "decode_ppl", "lm_eval", "passkey", "needle", "speed", "sinks")
METRICS = TEXT_METRICS + VISION_METRICS


@dataclass
class EvalSettings:
    data: str | None = None  # perplexity text: None = WikiText-2 test if found, else fallback
    ppl_tokens: int | None = 16384
    ppl_window: int = 1024
    ppl_stride: int | None = None
    decode_tokens: int = 512
    decode_prefill: int = 256  # tokens prefilled (and compressed by KV methods) before decoding
    lm_eval_tasks: list[str] = field(default_factory=lambda: list(lm_tasks.LOCAL_TASKS))
    lm_eval_limit: int | None = 200
    task_items: int = 200
    task_text: str | None = None  # source of the local tasks: None = WikiText-2 valid if found
    tasks_dir: str | None = None  # where local tasks are generated (default: <out>/tasks)
    retrieval_lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    retrieval_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    retrieval_samples: int = 1
    query_agnostic: bool = False  # retrieval: compress the context before the question (compress_context)
    speed_lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    decode_prompt: int = 256
    decode_new_tokens: int = 64
    seed: int = 0


def environment(seed: int) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "seed": seed,
           "device": "cuda" if torch.cuda.is_available() else "cpu",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    for package in ("attnpatch", "lm_eval", "diffusers", "peft", "accelerate"):
        try:
            env[package] = __import__(package).__version__
        except Exception:
            pass
    return env


class _Inputs:
    """Inputs shared by every method, built once (so every method sees the same data)."""

    def __init__(self, tokenizer, metrics, settings: EvalSettings, out_dir: Path, vision_inputs: dict | None):
        self.settings = settings
        self.vision = vision_inputs or {}
        self.text_desc = None
        if {"ppl", "decode_ppl", "sinks"} & set(metrics):
            text, self.text_desc = load_text(settings.data, "test")
            self.ids = tokenizer(text, return_tensors="pt").input_ids[0]
        self.out_dir = out_dir
        if "lm_eval" in metrics:
            local = [t for t in settings.lm_eval_tasks if t in lm_tasks.LOCAL_TASKS]
            self.tasks_dir = None
            if local:
                task_text, self.task_desc = load_text(settings.task_text, "valid")
                self.tasks_dir = lm_tasks.prepare_local_tasks(settings.tasks_dir or out_dir / "tasks", task_text,
                                                              settings.task_items, settings.seed)
        self.cases = {}
        for kind in ("passkey", "needle"):
            if kind in metrics:
                haystack = load_text(None, "valid")[0] if kind == "needle" else None
                self.cases[kind] = retrieval.make_cases(tokenizer, kind, settings.retrieval_lengths,
                                                        settings.retrieval_depths, settings.retrieval_samples,
                                                        settings.seed, haystack)


def _measure(metric, model, tokenizer, inputs: _Inputs, dense: dict, label: str, progress: bool):
    s = inputs.settings
    if metric == "ppl":
        return windowed_perplexity(model, inputs.ids, s.ppl_window, s.ppl_stride, s.ppl_tokens, desc=f"{label} ppl",
                                   progress=progress).as_dict()
    if metric == "decode_ppl":
        return decoding_perplexity(model, inputs.ids, s.decode_tokens, prefill=s.decode_prefill,
                                   desc=f"{label} decode ppl", progress=progress, tokenizer=tokenizer).as_dict()
    if metric == "lm_eval":
        return lm_tasks.run_lm_eval(model, tokenizer, s.lm_eval_tasks, include_path=inputs.tasks_dir,
                                    limit=s.lm_eval_limit, seed=s.seed)
    if metric in ("passkey", "needle"):
        return retrieval.evaluate_retrieval(model, tokenizer, inputs.cases[metric], progress=progress,
                                            query_agnostic=s.query_agnostic and bool(patched_configs(model))).as_dict()
    if metric == "speed":
        measured = {"prefill": speed.prefill_latency(model, s.speed_lengths, seed=s.seed),
                    "decode": speed.decode_speed(model, s.decode_prompt, s.decode_new_tokens, s.seed)}
        if label == "dense" and hasattr(model, "set_attn_implementation"):  # the floor, beside dense
            measured["floor"] = speed.floor_speed(model, s.speed_lengths, s.decode_prompt, s.decode_new_tokens,
                                                  seed=s.seed)
        return measured
    if metric == "sinks":  # 4 sequences of 512 tokens; exact-softmax attention of the (patched) model's q/k
        from ..analysis.sink_inspector import inspect_sinks

        batches = [inputs.ids[i * 512:(i + 1) * 512][None] for i in range(4) if inputs.ids.numel() >= (i + 1) * 512]
        report = inspect_sinks(model, batches or [inputs.ids[None, :512]], progress=progress)
        tower = report.towers[0]
        plot = inputs.out_dir / f"sinks_{''.join(c if c.isalnum() else '_' for c in label)}.png"
        report.plot(plot, tower=tower)
        first, massive = report.first_token[tower], report.massive.get(tower, [])
        return {"first_token_mass": float(first.nanmean()), "heads_over_half": int((first > 0.5).sum()),
                "heads": int((~first.isnan()).sum()), "other_sink_mass": float(report.other_sinks[tower].nanmean()),
                "max_activation": max((row["values"][0] for row in massive), default=float("nan")),
                "max_activation_vs_median": max((row["ratio"] for row in massive), default=float("nan")),
                "plot": plot.name, "table": report.table(tower)}
    v = inputs.vision
    if metric in ("vit", "clip"):
        with torch.no_grad():  # warm-up on one image, not timed
            model(pixel_values=v["pixel_values"][:1], **({} if metric == "vit" else
                                                          {"input_ids": v["input_ids"], "attention_mask": v.get("attention_mask")}))
        start = time.perf_counter()
        if metric == "vit":
            out = vision.classifier_outputs(model, v["pixel_values"])
        else:
            out = vision.clip_outputs(model, v["pixel_values"], v["input_ids"], v.get("attention_mask"))
        rate = len(v["pixel_values"]) / (time.perf_counter() - start)
        dense.setdefault(metric, out)
        dense.setdefault(f"{metric}_rate", rate)
        compare = vision.compare_classifier if metric == "vit" else vision.compare_clip
        return {**compare(dense[metric], out, v.get("labels")), "images_per_second": rate,
                "speedup_vs_dense": rate / dense[f"{metric}_rate"]}
    if metric == "dit" and v.get("steps"):  # a sampling trajectory: what reuse across steps needs
        out = vision.dit_sample(model, v["sample"], v["steps"], **v.get("conditioning", {}))
        dense.setdefault("dit", out)
        return vision.compare_dit_samples(dense["dit"], out)
    if metric == "dit":
        out = vision.dit_outputs(model, v["sample"], v["timesteps"], **v.get("conditioning", {}))
        dense.setdefault("dit", out)
        return vision.compare_dit(dense["dit"], out)
    if metric == "llava":
        out = vision.llava_outputs(model, v["llava"])
        dense.setdefault("llava", out)
        return vision.compare_llava(dense["llava"], out)
    raise ValueError(f"unknown metric {metric!r}; known metrics: {', '.join(METRICS)}")


def run_grid(model, tokenizer, methods: list[str], metrics: list[str], settings: EvalSettings | None = None,
             out_dir: str | Path = "eval/results/run", vision_inputs: dict | None = None, model_name: str = "",
             progress: bool = True) -> dict:
    """Measure every metric for dense and each method spec; write results.json, report.md, plots."""
    settings = settings or EvalSettings()
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known metrics: {', '.join(METRICS)}")
    specs = ["dense"] + [m for m in methods if m != "dense"]
    configs = {spec: parse_method_spec(spec) for spec in specs}  # validate all before any work
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    inputs = _Inputs(tokenizer, metrics, settings, out_dir, vision_inputs)
    results: dict = {spec: {} for spec in specs}
    seconds: dict = {metric: {} for metric in metrics}
    dense_outputs: dict = {}
    for spec in tqdm(specs, desc="methods", disable=not progress):
        if configs[spec] is not None:
            patch_model(model, configs[spec])
        try:
            for metric in metrics:
                t0 = time.perf_counter()
                results[spec][metric] = _measure(metric, model, tokenizer, inputs, dense_outputs, spec, progress)
                seconds[metric][spec] = time.perf_counter() - t0
        finally:
            if configs[spec] is not None:
                unpatch_model(model)
    report = {"model": model_name or type(model).__name__, "environment": environment(settings.seed),
              "settings": asdict(settings), "text": inputs.text_desc, "methods": specs, "metrics": metrics,
              "results": results, "seconds": seconds}
    (out_dir / "results.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (out_dir / "report.md").write_text(render_markdown(report))
    make_plots(report, out_dir)
    return report


# ----------------------------------------------------------------------------- rendering
