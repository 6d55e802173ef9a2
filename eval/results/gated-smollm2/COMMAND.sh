# Regenerates eval/results/gated-smollm2/ from the repository root (or: python -m eval run gated-smollm2).
# gated_smollm2.py docstring + recipe header: gate-only recipe (writes out/smollm2-gated) then the
# eval script (default flags).
accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_gated.yaml
python eval/benchmarks/gated_smollm2.py --checkpoint out/smollm2-gated/final --out eval/results/gated-smollm2
