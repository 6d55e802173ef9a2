"""Built-in methods, one folder per family (a family's base class holds what its methods share).
The registry (attnpatch/registry.py) registers BUILTIN_METHODS by name."""

from .heads.duo import DuoHeads
from .heads.kv_merge import KVMerge
from .heads.prune import PruneHeads
from .kv import H2O, TOVA, KeyDiff, KNorm, KVQuant, KVzip, PyramidKV, SnapKV, StreamingLLM
from .kv.mla import MultiHeadLatentAttention
from .linear.linear import LinearAttention
from .linear.lolcats import LolcatsAttention
from .reference import SoftmaxAttention
from .sinks.act import AttentionCalibration
from .sinks.gated import GatedAttention
from .sinks.var import VisualAttentionRedistribution
from .sparse.a_shape import AShapeAttention
from .sparse.agent import AgentAttention
from .sparse.attention_reuse import AttentionReuse
from .sparse.bigbird import BigBirdAttention
from .sparse.block_topk import BlockTopKAttention
from .sparse.seer_gate import SeerGateAttention
from .sparse.sliding_window import SlidingWindowAttention
from .sparse.star import StarAttention
from .sparse.vertical_slash import VerticalSlashAttention
from .sparse.window_2d import Window2DAttention
from .tokens.token_merge import TokenMerge
from .tokens.visual_token_prune import VisualTokenPrune

BUILTIN_METHODS = (
    SoftmaxAttention,
    # sparse
    SlidingWindowAttention, AShapeAttention, BlockTopKAttention, BigBirdAttention, StarAttention,
    VerticalSlashAttention, Window2DAttention, AgentAttention, SeerGateAttention, AttentionReuse,
    # linearized
    LinearAttention, LolcatsAttention,
    # head-pruned
    PruneHeads, DuoHeads,
    # kv-compressed
    StreamingLLM, H2O, SnapKV, PyramidKV, TOVA, KNorm, KeyDiff, KVzip, KVQuant, KVMerge,
    MultiHeadLatentAttention,
    # sink-recalibrated
    AttentionCalibration, GatedAttention, VisualAttentionRedistribution,
    # tokens
    VisualTokenPrune, TokenMerge,
)
