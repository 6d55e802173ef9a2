# Regenerates eval/results/duo-smollm2/ from the repository root (or: python -m eval run duo-smollm2).
# Script docstring/argparse default --out; results.json setup equals defaults (writes gates.pt too).
# ~30 min CPU.
python eval/benchmarks/duo_smollm2.py --out eval/results/duo-smollm2
