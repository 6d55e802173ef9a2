"""Sparse attention, one file per method. Block-sparse methods (base.py) build a `BlockLayout` per
call and compute only the key blocks it keeps; sliding_window works token by token; grid methods
(grid.py: window_2d, agent) see ViT/DiT tokens as a 2-D patch grid."""
