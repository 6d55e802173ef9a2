# Regenerates eval/results/long-prefill-32k-3repeats/ from the repository root (or: python -m eval run long-prefill-32k-3repeats).
# Results README line; prefill.json records the same flags with --out /tmp/runs/lp32k3.
python eval/benchmarks/long_prefill.py --lengths 32768 --methods lolcats block_topk --density --dense-max 0 --repeats-long 3 --out eval/results/long-prefill-32k-3repeats
