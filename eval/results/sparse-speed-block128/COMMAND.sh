# Regenerates eval/results/sparse-speed-block128/ from the repository root (or: python -m eval run sparse-speed-block128).
# Built from speed.json settings (lengths, density, block); methods as in the committed rows (the
# default now adds seer_gate).
python eval/benchmarks/sparse_speed.py --lengths 16384 --density 0.1 --block 128 --methods a_shape block_topk bigbird star vertical_slash --out eval/results/sparse-speed-block128
