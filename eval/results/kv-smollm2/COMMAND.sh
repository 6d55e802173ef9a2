# Regenerates eval/results/kv-smollm2/ from the repository root (or: python -m eval run kv-smollm2).
# Shell file, first `attnpatch eval` call (results README heading; results.json settings match). It
# also writes streaming-check-smollm2. the script now adds keydiff and kvzip, which the committed
# results.json does not have, and its kv_quant rows predate the re-run in kv-quant-smollm2.
bash eval/runs/run_kv_smollm2.sh
