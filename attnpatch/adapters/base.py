"""What every adapter provides: the attention sites of a model and how to route them."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

# Families whose tiny configs run in the test suite (anything else routed the same way also works).
SUPPORTED_FAMILIES = (
    "transformers decoders: Llama, Mistral, Qwen2, Qwen3, Gemma2, Phi3 (and other Llama-family models "
    "that route attention through AttentionInterface); transformers encoders: ViT, CLIP (text and "
    "vision towers), SigLIP; VLMs: Llava (vision tower and language model); diffusers: "
    "DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel"
)


@dataclass(frozen=True)
class HeadAccess:
    """How to reach one attention module's per-head weights, for head surgery (adapters fill it in,
    methods use it without naming the model family)."""

    projections: tuple[str, str, str, str]  # attribute names of the q, k, v and output projections
    # the module class builds its projections from config.head_dim, so a config with fewer heads
    # and an explicit head_dim rebuilds the pruned shapes; otherwise (CLIP) head_dim is
    # hidden_size / num_heads and a saved checkpoint must keep the full head count
    config_sets_head_dim: bool
    count_attrs: tuple[tuple[str, str], ...] = ()  # (module attribute, "heads" | "kv_heads" | "groups")


@dataclass
class AttentionSite:
    """One attention module of a model, with the geometry methods need."""

    path: str  # module path in the model, e.g. "model.layers.3.self_attn"
    module: nn.Module
    tower: str  # path of the stack of layers it belongs to, e.g. "model.layers"
    layer: int  # index within that stack
    num_layers: int  # layers in that stack
    kind: str  # "decoder", "encoder" or "diffusion"
    causal: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int
    cross: bool = False
    heads: HeadAccess | None = None  # None where the adapter cannot do head surgery (fused qkv, diffusers)
    joint: bool = False  # attends image and text tokens joined in one call (SD3's joint attention)
    # what methods may ask of the whole model (adapters/parts.py: VLM towers, rotary embedding, the norm ->
    # MLP pair, ...), shared by every site of a model
    parts: object = field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str:
        return f"{self.tower}[{self.layer}]"


def split_layer_path(path: str) -> tuple[str, int] | None:
    """'model.layers.3.self_attn' -> ('model.layers', 3): the innermost numbered container."""
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[:i]), int(parts[i])
    return None


def tower_depths(placements) -> dict[str, int]:
    """{tower: number of layers} from (tower, layer index) pairs."""
    depths: dict[str, int] = {}
    for tower, layer in placements:
        depths[tower] = max(depths.get(tower, 0), layer + 1)
    return depths


class Adapter:
    """Knows one model library: where attention modules are and how to route them to attnpatch."""

    name: str

    def applies_to(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def sites(self, model: nn.Module) -> list[AttentionSite]:
        raise NotImplementedError

    def install(self, site: AttentionSite, handler) -> None:
        """Route the site's attention through `handler(call) -> output`."""
        raise NotImplementedError

    def uninstall(self, site: AttentionSite) -> None:
        raise NotImplementedError

    def watch_model(self, model: nn.Module, placements) -> object:
        """Model-level checks that a patch is really active (e.g. that cache-keeping modules see the
        model's cache); returns a callable that removes them, or None when there is nothing to watch."""
        return None
