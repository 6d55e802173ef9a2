"""KV-cache compression: one scorer per file on a shared base (base.py), and kv_quant. A new scorer
subclasses `KVCompressionMethod` in its own file; the registry finds it there."""

from .base import KVCacheMethod, KVCompressionMethod

__all__ = ["KVCacheMethod", "KVCompressionMethod"]
