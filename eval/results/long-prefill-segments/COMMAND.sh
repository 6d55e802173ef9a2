# Regenerates eval/results/long-prefill-segments/ from the repository root (or: python -m eval run long-prefill-segments).
# Results README line and prefill.json command.
python eval/benchmarks/long_prefill.py --lengths 16384 32768 --methods linear lolcats sliding_window --dense-max 0 --density --repeats 2 --out eval/results/long-prefill-segments
