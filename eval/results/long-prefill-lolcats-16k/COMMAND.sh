# Regenerates eval/results/long-prefill-lolcats-16k/ from the repository root (or: python -m eval run long-prefill-lolcats-16k).
# Results README line and prefill.json command.
python eval/benchmarks/long_prefill.py --lengths 16384 --methods lolcats linear --dense-max 0 --density --repeats 3 --out eval/results/long-prefill-lolcats-16k
