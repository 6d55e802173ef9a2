"""The adapter side of a call: normalising what a model library passes (normalise.py), equipping its
cache with a method's layers (cache.py) and dispatching to the method (dispatch.py). Above the methods:
adapters import it; methods never do (their services are runtime/, below them)."""
