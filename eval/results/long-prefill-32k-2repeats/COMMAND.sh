# Regenerates eval/results/long-prefill-32k-2repeats/ from the repository root (or: python -m eval run long-prefill-32k-2repeats).
# Command recorded in prefill.json; same as results README line.
python eval/benchmarks/long_prefill.py --lengths 32768 --dense-max 16384 --density --repeats-long 2 --out eval/results/long-prefill-32k-2repeats
