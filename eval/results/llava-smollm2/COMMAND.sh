# Regenerates eval/results/llava-smollm2/ from the repository root (or: python -m eval run llava-smollm2).
# Docstring + argparse default; the METHODS default equals results.json methods (builds
# /tmp/attnpatch-llava-smollm2 first).
python eval/benchmarks/llava_smollm2.py --out eval/results/llava-smollm2
