#!/usr/bin/env bash
# Block-sparse prefill on SmolLM2-135M through `attnpatch eval` (about 40 min on 2 CPU cores):
# WikiText-2 test perplexity in 2k / 4k / 8k-token windows (16k tokens scored each) and passkey
# accuracy at 2k / 4k / 8k tokens, for every method at two fixed budgets (64-token blocks):
#   wide:   ~576 key tokens per query block (a_shape 1 sink + 8 local blocks, block_topk 1 sink + 2 local + 6 chosen, ...)
#   narrow: ~320 (half of that).
# A fixed budget is a falling fraction of the context: at 8k, wide computes ~7% of the causal blocks.
set -euo pipefail
cd "$(dirname "$0")/../.."
methods=(
  a_shape:sink_blocks=1,local_blocks=8 block_topk:top_k=6,local_blocks=2 bigbird:window_blocks=3,global_blocks=1,random_blocks=2
  star:context_blocks=16,anchor_blocks=1 vertical_slash:vertical=256,slash=3
  a_shape:sink_blocks=1,local_blocks=4 block_topk:top_k=2,local_blocks=2 bigbird:window_blocks=1,global_blocks=1,random_blocks=1
  star:context_blocks=8,anchor_blocks=1 vertical_slash:vertical=128,slash=2
)
for w in 2048 4096 8192; do
  attnpatch eval --methods "${methods[@]}" --metrics ppl --window "$w" --ppl-tokens 16384 \
    --out "eval/results/sparse-smollm2/ppl-$w" "$@"
done
attnpatch eval --methods "${methods[@]}" --metrics passkey --lengths 2048 4096 8192 \
  --out eval/results/sparse-smollm2/passkey "$@"
