"""Built-in methods; importing this package registers them."""

from . import act, duo, gated, heads, kv, linear, lolcats, reference, sliding, sparse, visual_sinks, visual_tokens  # noqa: F401
