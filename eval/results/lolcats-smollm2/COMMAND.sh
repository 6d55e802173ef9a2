# Regenerates eval/results/lolcats-smollm2/ from the repository root (or: python -m eval run lolcats-smollm2).
# recipes/README (window 64 -> lolcats-smollm2/); overrides and output_dirs (/tmp/train/...) from the
# recipe in each summary.json; compare_conversion.py and lolcats_speed.py docstrings. speed.json
# records --converted out/smollm2-lolcats/final, which then held the window-64 recipe (commit
# 0be0cf5); today that path is the window-128 recipe, so point it at the window-64 run.
accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_lolcats.yaml --set attention.params.window=64 --set stage2.train_attnpatch=false --set output_dir=/tmp/train/lolcats
accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_dense_lora_control.yaml --set output_dir=/tmp/train/control
mkdir -p eval/results/lolcats-smollm2 && cp /tmp/train/lolcats/summary.json /tmp/train/lolcats/perplexity_vs_tokens.png eval/results/lolcats-smollm2/ && cp /tmp/train/control/summary.json eval/results/lolcats-smollm2/control_dense_lora_summary.json
python eval/benchmarks/compare_conversion.py eval/results/lolcats-smollm2/summary.json eval/results/lolcats-smollm2/control_dense_lora_summary.json --out eval/results/lolcats-smollm2
python eval/benchmarks/lolcats_speed.py --converted /tmp/train/lolcats/final --out eval/results/lolcats-smollm2
