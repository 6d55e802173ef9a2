"""Built-in methods; importing this package registers them."""

from . import duo, gated, heads, kv, linear, lolcats, reference, sliding, sparse  # noqa: F401
