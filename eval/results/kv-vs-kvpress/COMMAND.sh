# Regenerates eval/results/kv-vs-kvpress/ from the repository root (or: python -m eval run kv-vs-kvpress).
# Command recorded in results.json; docstring. Creates the kvpress 0.5.5 venv on first use (needs pip
# access).
python eval/benchmarks/kv_vs_kvpress.py --out eval/results/kv-vs-kvpress
