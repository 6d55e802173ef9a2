# Regenerates eval/results/long-prefill-sliding-16k/ from the repository root (or: python -m eval run long-prefill-sliding-16k).
# prefill.json command (--out /tmp/lp16, copied in; the committed folder has no prefill.png); the
# results README names only the folder.
python eval/benchmarks/long_prefill.py --lengths 16384 --methods sliding_window --dense-max 0 --repeats 3 --density --out eval/results/long-prefill-sliding-16k
