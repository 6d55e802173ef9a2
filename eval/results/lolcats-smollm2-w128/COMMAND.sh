# Regenerates eval/results/lolcats-smollm2-w128/ from the repository root (or: python -m eval run lolcats-smollm2-w128).
# recipes/README + recipe header; overrides from summary.json's recipe (maps frozen in stage 2), then
# compare_conversion.py.
accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_lolcats.yaml --set stage2.train_attnpatch=false --set output_dir=out/smollm2-lolcats-w128
mkdir -p eval/results/lolcats-smollm2-w128 && cp out/smollm2-lolcats-w128/summary.json eval/results/lolcats-smollm2-w128/
python eval/benchmarks/compare_conversion.py eval/results/lolcats-smollm2-w128/summary.json eval/results/lolcats-smollm2/control_dense_lora_summary.json --out eval/results/lolcats-smollm2-w128
