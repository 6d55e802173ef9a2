# Regenerates eval/results/streaming-check-smollm2/ from the repository root (or: python -m eval run streaming-check-smollm2).
# Shell file, second call (`attnpatch eval --methods streaming:budget=256,sinks=4
# streaming:budget=256,sinks=0 --metrics decode_ppl --decode-tokens 2048 --decode-prefill 64 --out
# eval/results/streaming-check-smollm2`); results.json matches.
bash eval/runs/run_kv_smollm2.sh
