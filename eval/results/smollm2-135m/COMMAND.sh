# Regenerates eval/results/smollm2-135m/ from the repository root (or: python -m eval run smollm2-135m).
# Results README line (the default --out is eval/results/<model> = smollm2-135m); results.json
# methods, metrics and settings match.
attnpatch eval --methods sliding_window:window=256,sinks=4 sliding_window:window=64,sinks=4 linear --metrics ppl decode_ppl lm_eval passkey speed --out eval/results/smollm2-135m
