# Regenerates eval/results/seer-smollm2/ from the repository root (or: python -m eval run seer-smollm2).
# seer_smollm2.py docstring + results README heading; --depths/--budgets from results.json settings
# (not the defaults).
accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_seer_gate.yaml
python eval/benchmarks/seer_smollm2.py --gate out/smollm2-seer-gate/final --depths 0.0 0.5 1.0 --budgets 2,2 --out eval/results/seer-smollm2
