"""KV-cache compression: one scorer per file on a shared base (base.py), and kv_quant."""

from .base import KVCacheMethod, KVCompressionMethod
from .h2o import H2O
from .keydiff import KeyDiff
from .knorm import KNorm
from .kvzip import KVzip
from .pyramidkv import PyramidKV
from .quant import KVQuant
from .snapkv import SnapKV
from .streaming import StreamingLLM
from .tova import TOVA

__all__ = ["H2O", "KeyDiff", "KNorm", "KVCacheMethod", "KVCompressionMethod", "KVQuant", "KVzip", "PyramidKV", "SnapKV", "StreamingLLM", "TOVA"]
