# Regenerates eval/results/long-prefill-block-sparse/ from the repository root (or: python -m eval run long-prefill-block-sparse).
# Results README line and prefill.json command (no --density, so the default 10% rows are in).
python eval/benchmarks/long_prefill.py --lengths 16384 32768 --methods a_shape block_topk --dense-max 0 --repeats 2 --repeats-long 2 --out eval/results/long-prefill-block-sparse
