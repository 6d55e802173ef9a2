# Regenerates eval/results/lolcats-smollm2-w128-stage2-maps/ from the repository root (or: python -m eval run lolcats-smollm2-w128-stage2-maps).
# recipes/README: the recipe as shipped, stage 2 resumed from the w128 run's stage 1 (its summary
# shows 0 stage-1 tokens); output_dir from summary.json. Needs lolcats-smollm2-w128's run first.
mkdir -p out/smollm2-lolcats-w128-s2attn && cp -r out/smollm2-lolcats-w128/stage1 out/smollm2-lolcats-w128-s2attn/
accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_lolcats.yaml --set output_dir=out/smollm2-lolcats-w128-s2attn
mkdir -p eval/results/lolcats-smollm2-w128-stage2-maps && cp out/smollm2-lolcats-w128-s2attn/summary.json eval/results/lolcats-smollm2-w128-stage2-maps/
python eval/benchmarks/compare_conversion.py eval/results/lolcats-smollm2-w128-stage2-maps/summary.json eval/results/lolcats-smollm2/control_dense_lora_summary.json --out eval/results/lolcats-smollm2-w128-stage2-maps
