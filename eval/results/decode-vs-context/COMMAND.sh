# Regenerates eval/results/decode-vs-context/ from the repository root (or: python -m eval run decode-vs-context).
# Results README heading; decode_speed.json records the same flags with --out /tmp/runs/dvc2 (copied
# in afterwards).
python eval/benchmarks/kv_decode_speed.py --contexts 1024 2048 4096 8192 16384 32768 --new-tokens 32 --methods linear lolcats sliding_window snapkv streaming --out eval/results/decode-vs-context
