# Regenerates eval/results/kv-trained-smollm2/ from the repository root (or: python -m eval run kv-trained-smollm2).
# Script docstring + TRAINED table in kv_trained_smollm2.py (recipe, run folder, --set overrides) +
# settings in results.json / segments4/results.json; compare_conversion.py for the subfolders (control
# = the 16,384-token control, as in their .md). many steps; kv_merge and the old mla-rank96 runs were
# stopped for time (partial summaries); mla_rank96_partial_summary.json comes from an older plain-PCA
# run (out/smollm2-mla-96; now roughly --set attention.params.init=kv plus the rank-96 rotated
# overrides), so it is used as committed.
accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_dense_lora_control.yaml
accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_kv_merge.yaml
accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_mla.yaml --set attention.params.rank=96 --set attention.params.keys=rotated --set attention.params.value_rank=null --set stage2.train_attnpatch=false --set stage2.attnpatch_lr=null --set output_dir=out/smollm2-mla-96-att
accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_mla.yaml --set attention.params.rank=64 --set attention.params.keys=rotated --set attention.params.value_rank=null --set stage2.train_attnpatch=false --set stage2.attnpatch_lr=null --set output_dir=out/smollm2-mla-64-att
accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_mla.yaml --set stage2.train_attnpatch=false --set stage2.attnpatch_lr=null
accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_mla.yaml --set attention.params.rank=40 --set attention.params.value_rank=88 --set stage2.steps=0 --set output_dir=out/smollm2-mla-pre-rope-third
mkdir -p out/smollm2-mla-pre-rope-s2f && cp -r out/smollm2-mla-pre-rope/stage1 out/smollm2-mla-pre-rope-s2f/
accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_mla.yaml --set output_dir=out/smollm2-mla-pre-rope-s2f
python eval/benchmarks/kv_trained_smollm2.py --segments 1 --eviction streaming h2o tova snapkv knorm --trained "kv_merge 3->1" "mla rank 96" "mla rank 64" "mla pre-RoPE keys 64 + values 128" "mla pre-RoPE keys 40 + values 88" --out eval/results/kv-trained-smollm2
python eval/benchmarks/kv_trained_smollm2.py --segments 4 --eviction snapkv --trained "mla pre-RoPE keys 64 + values 128" "mla pre-RoPE keys 64 + values 128, factors also in stage 2" --out eval/results/kv-trained-smollm2/segments4
mkdir -p eval/results/kv-trained-smollm2/mla-pre-rope eval/results/kv-trained-smollm2/mla-pre-rope-factors-stage2 eval/results/kv-trained-smollm2/mla-rank96-attention eval/results/kv-trained-smollm2/mla-rank96 && cp out/smollm2-mla-pre-rope/summary.json eval/results/kv-trained-smollm2/mla-pre-rope/ && cp out/smollm2-mla-pre-rope-s2f/summary.json eval/results/kv-trained-smollm2/mla-pre-rope-factors-stage2/ && cp out/smollm2-mla-96-att/summary.json eval/results/kv-trained-smollm2/mla-rank96-attention/ && cp out/smollm2-kv-merge/summary.json eval/results/kv-trained-smollm2/kv_merge_3to1_partial_summary.json
python eval/benchmarks/compare_conversion.py eval/results/kv-trained-smollm2/mla-pre-rope/summary.json eval/results/lolcats-smollm2/control_dense_lora_summary.json --out eval/results/kv-trained-smollm2/mla-pre-rope
python eval/benchmarks/compare_conversion.py eval/results/kv-trained-smollm2/mla-pre-rope-factors-stage2/summary.json eval/results/lolcats-smollm2/control_dense_lora_summary.json --out eval/results/kv-trained-smollm2/mla-pre-rope-factors-stage2
python eval/benchmarks/compare_conversion.py eval/results/kv-trained-smollm2/mla-rank96-attention/summary.json eval/results/lolcats-smollm2/control_dense_lora_summary.json --out eval/results/kv-trained-smollm2/mla-rank96-attention
python eval/benchmarks/compare_conversion.py eval/results/kv-trained-smollm2/mla_rank96_partial_summary.json eval/results/lolcats-smollm2/control_dense_lora_summary.json --out eval/results/kv-trained-smollm2/mla-rank96
