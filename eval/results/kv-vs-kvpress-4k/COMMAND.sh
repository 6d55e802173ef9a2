# Regenerates eval/results/kv-vs-kvpress-4k/ from the repository root (or: python -m eval run kv-vs-kvpress-4k).
# Command recorded in results.json (commit fed7a11).
python eval/benchmarks/kv_vs_kvpress.py --lengths 4096 --kinds passkey --modes query_agnostic --only streaming tova knorm keydiff snapkv --out eval/results/kv-vs-kvpress-4k
