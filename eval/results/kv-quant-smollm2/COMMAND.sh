# Regenerates eval/results/kv-quant-smollm2/ from the repository root (or: python -m eval run kv-quant-smollm2).
# Built from results.json (methods, metrics, settings): run_kv_smollm2.sh's first call restricted to
# kv_quant (commit b5c6b0e). (the exact command line is written nowhere).
attnpatch eval --methods kv_quant:bits=4 kv_quant:bits=2 --metrics decode_ppl passkey --decode-tokens 1024 --decode-prefill 512 --lengths 1024 2048 --out eval/results/kv-quant-smollm2
