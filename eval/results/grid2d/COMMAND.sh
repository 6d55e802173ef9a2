# Regenerates eval/results/grid2d/ from the repository root (or: python -m eval run grid2d).
# Docstring + argparse default; grid2d.json settings equal defaults.
python eval/benchmarks/grid2d_eval.py --out eval/results/grid2d
