# Regenerates eval/results/decode-linear-2k/ from the repository root (or: python -m eval run decode-linear-2k).
# Command recorded in decode_speed.json, same as results README line.
python eval/benchmarks/kv_decode_speed.py --contexts 1024 2048 4096 --new-tokens 64 --methods linear lolcats --out eval/results/decode-linear-2k
