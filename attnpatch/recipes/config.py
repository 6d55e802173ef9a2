"""Recipe files: YAML describing a conversion (model, attention, data, stages, output)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from ..errors import PatchError


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # local text/JSON files, or one hub dataset id
    eval: list[str] = field(default_factory=list)
    hub_config: str | None = None  # e.g. "wikitext-2-raw-v1" for a hub dataset
    hub_train_split: str = "train"
    hub_eval_split: str = "validation"
    text_field: str = "text"
    seq_len: int = 512
    train_tokens: int = 100_000
    eval_tokens: int = 16_384


@dataclass
class StageConfig:
    steps: int = 0  # 0 skips the stage
    lr: float = 1e-3
    batch_size: int = 1
    grad_accum: int = 1
    eval_every: int = 50
    checkpoint_every: int = 100
    weight_decay: float = 0.0
    # recompute each layer in backward instead of keeping its activations (transformers' gradient
    # checkpointing): activation memory from every layer's working set down to its input
    gradient_checkpointing: bool = False
    lr_schedule: str = "constant"  # constant | cosine (to 0 at `steps`, after a linear warm-up)
    warmup_steps: int = 0
    # stage 1 only: weight of Hedgehog's cross-entropy between softmax and student attention
    # weights, added to the per-layer output MSE (0 = MSE only)
    attention_ce: float = 0.0
    # stage 2 only: LoRA (lora_r 0 = none) and/or attnpatch's own parameters (e.g. gated's gates)
    train_attnpatch: bool = False
    attnpatch_lr: float | None = None  # with train_attnpatch: the patch's parameters' peak rate (None: lr), same schedule
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class PruneConfig:
    """Head pruning before the stages: heads scored on the first training blocks, the lowest
    removed with prune_heads (see HeadImportance.plan); ratio 0 skips it."""

    ratio: float = 0.0
    score: str = "gradient"  # gradient | output_norm | entropy | random
    scope: str = "layer"  # layer | global
    unit: str = "query"  # query | group (whole kv groups)
    balanced: bool = False  # the same number of query heads from every kv group
    greedy_steps: int = 1  # > 1: rescore with the chosen heads masked, in this many rounds
    calibration_blocks: int = 16


@dataclass
class FsdpConfig:
    """Fully sharded training (torch FSDP2, see recipes/sharding.py); also switched on by an accelerate
    config with `distributed_type: FSDP` (and `fsdp_offload_params`)."""

    enabled: bool = False
    cpu_offload: bool = False  # parameters, gradients and optimizer state live on the CPU between uses
    reshard_after_forward: bool = True  # free each block's gathered parameters after its forward (less memory)


@dataclass
class RecipeConfig:
    model: str
    attention: dict | None  # a PatchConfig dict: {"method": "lolcats", "params": {...}, ...}, or None
    data: DataConfig
    stage1: StageConfig = field(default_factory=StageConfig)  # attention transfer
    stage2: StageConfig = field(default_factory=StageConfig)  # LoRA recovery
    prune: PruneConfig = field(default_factory=PruneConfig)  # head pruning, before the attention patch
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)  # shard parameters across processes
    output_dir: str = "out/recipe"
    seed: int = 0
    dtype: str = "float32"
    merge_lora: bool = True
    calibration_blocks: int = 16  # training blocks whose activations start mla / kv_merge pca (0: the projections' SVD)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> "RecipeConfig":
        raw = yaml.safe_load(Path(path).read_text())
        for item in overrides or []:  # key.sub=value, values parsed as YAML
            key, _, value = item.partition("=")
            target = raw
            *parents, leaf = key.split(".")
            for part in parents:
                target = target.setdefault(part, {})
            target[leaf] = yaml.safe_load(value)
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "recipe") -> "RecipeConfig":
        def build(kind, data, name):
            known = {f.name for f in fields(kind)}
            unknown = sorted(set(data or {}) - known)
            if unknown:
                raise PatchError(f"{where}: unknown field(s) {unknown} in '{name}'; known: {sorted(known)}")
            return kind(**(data or {}))

        missing = [k for k in ("model", "data") if k not in raw]
        if missing:
            raise PatchError(f"{where}: missing required field(s) {missing}")
        if raw.get("attention") is None and not (raw.get("prune") or {}).get("ratio"):
            raise PatchError(f"{where}: give an 'attention' patch, a 'prune' section with a ratio, or both")
        sections = ("data", "stage1", "stage2", "prune", "fsdp")
        top = {k: v for k, v in raw.items() if k not in sections}
        config = build(cls, {"attention": None, **top, **dict.fromkeys(sections)}, "top level")
        config.data = build(DataConfig, raw["data"], "data")
        config.stage1 = build(StageConfig, raw.get("stage1"), "stage1")
        config.stage2 = build(StageConfig, raw.get("stage2"), "stage2")
        config.prune = build(PruneConfig, raw.get("prune"), "prune")
        config.fsdp = build(FsdpConfig, raw.get("fsdp"), "fsdp")
        from ..config import PatchConfig

        if config.attention is not None:  # validate early, with attnpatch's errors
            PatchConfig.from_dict(config.attention)
        for name in ("stage1", "stage2"):
            stage = getattr(config, name)
            if stage.lr_schedule not in ("constant", "cosine"):
                raise PatchError(f"{where}: {name}.lr_schedule must be 'constant' or 'cosine', got {stage.lr_schedule!r}")
            if stage.warmup_steps < 0:
                raise PatchError(f"{where}: {name}.warmup_steps must be >= 0, got {stage.warmup_steps}")
        if config.stage1.attnpatch_lr is not None:
            raise PatchError(f"{where}: stage1 trains only the patch's parameters; set its rate with stage1.lr, not "
                             "stage1.attnpatch_lr")
        if config.stage2.attnpatch_lr is not None and not (config.stage2.train_attnpatch and config.stage2.attnpatch_lr > 0):
            raise PatchError(f"{where}: stage2.attnpatch_lr must be > 0 and needs stage2.train_attnpatch: true, got "
                             f"{config.stage2.attnpatch_lr} with train_attnpatch {config.stage2.train_attnpatch}")
        if config.prune.ratio and (config.prune.greedy_steps < 1 or config.prune.calibration_blocks < 1):
            raise PatchError(f"{where}: prune.greedy_steps and prune.calibration_blocks must be >= 1")
        return config

    def to_dict(self) -> dict:
        return asdict(self)
