# Regenerates eval/results/sparse-smollm2/ from the repository root (or: python -m eval run sparse-smollm2).
# The shell file writes ppl-2048/4096/8192 and passkey/; perplexity.md comes from
# sparse_quality_table.py (docstring); calibration/ from calibrate_smollm2.py (docstring; settings
# match).
bash eval/runs/run_sparse_smollm2.sh
python eval/benchmarks/sparse_quality_table.py > eval/results/sparse-smollm2/perplexity.md
python eval/benchmarks/calibrate_smollm2.py --out eval/results/sparse-smollm2/calibration
