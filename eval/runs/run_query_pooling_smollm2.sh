#!/usr/bin/env bash
# block_topk's two query poolings on SmolLM2-135M through `attnpatch eval` (about 35 min on 2 CPU
# cores): per-query scoring (the default) against each query block's mean query. WikiText-2 test
# perplexity in 2k / 4k / 8k-token windows (16k tokens scored each) at the wide and narrow budgets
# of run_sparse_smollm2.sh, and passkey accuracy at 4k / 8k tokens (3 prompts per depth) at the wide one.
set -euo pipefail
cd "$(dirname "$0")/../.."
methods=(
  block_topk:top_k=6,local_blocks=2 block_topk:top_k=6,local_blocks=2,query_pooling=mean
  block_topk:top_k=2,local_blocks=2 block_topk:top_k=2,local_blocks=2,query_pooling=mean
)
out=eval/results/block-topk-query-pooling
for w in 2048 4096 8192; do
  attnpatch eval --methods "${methods[@]}" --metrics ppl --window "$w" --ppl-tokens 16384 --out "$out/ppl-$w" "$@"
done
python eval/benchmarks/sparse_quality_table.py "$out" > "$out/perplexity.md"
attnpatch eval --methods "${methods[@]:0:2}" --metrics passkey --lengths 4096 8192 --samples 3 --out "$out/passkey" "$@"
