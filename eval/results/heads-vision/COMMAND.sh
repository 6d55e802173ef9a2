# Regenerates eval/results/heads-vision/ from the repository root (or: python -m eval run heads-vision).
# Docstring + argparse default; results.json setup equals defaults.
python eval/benchmarks/heads_vision.py --out eval/results/heads-vision
