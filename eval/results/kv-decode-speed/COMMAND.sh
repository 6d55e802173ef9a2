# Regenerates eval/results/kv-decode-speed/ from the repository root (or: python -m eval run kv-decode-speed).
# Command recorded in decode_speed.json; results README ('--threads 1').
python eval/benchmarks/kv_decode_speed.py --threads 1 --contexts 1024 16384 --methods snapkv keydiff tova streaming tova:evict_every=16 --out eval/results/kv-decode-speed
