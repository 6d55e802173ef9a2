# Regenerates eval/results/heads-smollm2/ from the repository root (or: python -m eval run heads-smollm2).
# Main part: script default --out (setup = defaults). recovery/: results README ('--set
# prune.score=... prune.ratio=...'), overrides/output_dirs read from each summary.json, then
# heads_recovery_table.py (docstring). recovery.md used the OLD control (8192 eval tokens, constant
# lr; git 9ac56df:eval/results/lolcats-smollm2/control_dense_lora_summary.json), rebuilt here by
# overrides; the docstring's current control path would change the control column.
python eval/benchmarks/heads_smollm2.py --out eval/results/heads-smollm2
accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_dense_lora_control.yaml --set data.eval_tokens=8192 --set stage2.lr_schedule=constant --set stage2.warmup_steps=0 --set output_dir=out/smollm2-dense-lora-8k
accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_prune_recover.yaml
accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_prune_recover.yaml --set prune.score=output_norm --set output_dir=out/smollm2-prune-recover-output_norm
accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_prune_recover.yaml --set prune.score=entropy --set output_dir=out/smollm2-prune-recover-entropy
accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_prune_recover.yaml --set prune.score=random --set output_dir=out/smollm2-prune-recover-random
accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_prune_recover.yaml --set prune.ratio=0.6667 --set output_dir=out/smollm2-prune-recover-2of3
accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_prune_recover.yaml --set prune.score=random --set prune.ratio=0.6667 --set output_dir=out/smollm2-prune-recover-random-2of3
mkdir -p eval/results/heads-smollm2/recovery/ && cp out/smollm2-prune-recover/summary.json eval/results/heads-smollm2/recovery/gradient_summary.json && cp out/smollm2-prune-recover-output_norm/summary.json eval/results/heads-smollm2/recovery/output_norm_summary.json && cp out/smollm2-prune-recover-entropy/summary.json eval/results/heads-smollm2/recovery/entropy_summary.json && cp out/smollm2-prune-recover-random/summary.json eval/results/heads-smollm2/recovery/random_summary.json && cp out/smollm2-prune-recover-2of3/summary.json eval/results/heads-smollm2/recovery/gradient_2of3_summary.json && cp out/smollm2-prune-recover-random-2of3/summary.json eval/results/heads-smollm2/recovery/random_2of3_summary.json
python eval/benchmarks/heads_recovery_table.py eval/results/heads-smollm2/recovery/*summary*.json --control out/smollm2-dense-lora-8k/summary.json --out eval/results/heads-smollm2/recovery/recovery.md
