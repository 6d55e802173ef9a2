# Regenerates eval/results/long-prefill-block-sparse-128k/ from the repository root (or: python -m eval run long-prefill-block-sparse-128k).
# Results README line; prefill.json records the same flags with --out /tmp/runs/lp128.
python eval/benchmarks/long_prefill.py --lengths 65536 131072 --methods a_shape block_topk --dense-max 0 --density --out eval/results/long-prefill-block-sparse-128k
