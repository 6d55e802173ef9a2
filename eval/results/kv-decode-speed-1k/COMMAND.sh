# Regenerates eval/results/kv-decode-speed-1k/ from the repository root (or: python -m eval run kv-decode-speed-1k).
# Command recorded in decode_speed.json (commit 188ee22).
python eval/benchmarks/kv_decode_speed.py --threads 1 --contexts 1024 --methods snapkv keydiff tova streaming tova:evict_every=16 --out eval/results/kv-decode-speed-1k
