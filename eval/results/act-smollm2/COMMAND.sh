# Regenerates eval/results/act-smollm2/ from the repository root (or: python -m eval run act-smollm2).
# act_smollm2.py docstring (both steps) + results README; heldout/results.json methods/metrics match;
# defaults match calibration.json.
python eval/benchmarks/act_smollm2.py --out eval/results/act-smollm2
attnpatch eval --methods dense act eval/results/act-smollm2/act_config.json --metrics lm_eval --out eval/results/act-smollm2/heldout
