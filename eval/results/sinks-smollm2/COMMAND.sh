# Regenerates eval/results/sinks-smollm2/ from the repository root (or: python -m eval run sinks-smollm2).
# Docstring + argparse default; results README.
python eval/benchmarks/sinks_smollm2.py --out eval/results/sinks-smollm2
