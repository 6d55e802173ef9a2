"""Conversion recipes: YAML configs run under `accelerate launch` (see train.py)."""
