# Regenerates eval/results/seer-speed/ from the repository root (or: python -m eval run seer-speed).
# Built from speed.json settings (lengths, methods; the rest are defaults); the results README names
# only the folder.
python eval/benchmarks/sparse_speed.py --lengths 4096 16384 --methods block_topk seer_gate --out eval/results/seer-speed
