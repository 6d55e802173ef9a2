# Regenerates eval/results/recipes-dry-run/ from the repository root (or: python -m eval run recipes-dry-run).
# Docstring + recipes/README; dry_run_check.json records `python eval/benchmarks/dry_run_check.py` (default
# --out).
python eval/benchmarks/dry_run_check.py --out eval/results/recipes-dry-run
