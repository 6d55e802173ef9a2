"""attnpatch's cache layers: each replaces a transformers DynamicLayer for one method family while
reporting the sequence length and mask geometry of the layer it replaces."""

from .base import FullLengthGeometry, MappedBatchOps
from .compressed import CompressedKVLayer
from .duo import DuoHeadLayer
from .latent import LatentKVLayer
from .quantized import QuantizedKVLayer
from .recurrent import HybridWindowLayer, RecurrentStateLayer

__all__ = ["CompressedKVLayer", "DuoHeadLayer", "FullLengthGeometry", "HybridWindowLayer", "LatentKVLayer", "MappedBatchOps",
           "QuantizedKVLayer", "RecurrentStateLayer"]
