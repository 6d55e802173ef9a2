#!/usr/bin/env bash
# KV-cache compression on SmolLM2-135M, all through `attnpatch eval` (about 40 min on 2 CPU cores).
#  1. every method at compression 0.5 / 0.75 / 0.875 (kv_quant at 4 and 2 bits): decoding perplexity on
#     WikiText-2 test (512 tokens prefilled and compressed, 512 decoded token by token), KV bytes and
#     decode tokens/s read from the cache, passkey accuracy at 1k and 2k tokens;
#  2. the StreamingLLM check: 2048 tokens decoded with a 256-entry cache, with and without 4 sinks.
set -euo pipefail
cd "$(dirname "$0")/../.."
methods=()
for r in 0.5 0.75 0.875; do
  for m in streaming h2o snapkv pyramidkv tova knorm keydiff kvzip; do methods+=("$m:compression=$r"); done
done
methods+=("kv_quant:bits=4" "kv_quant:bits=2")
attnpatch eval --methods "${methods[@]}" --metrics decode_ppl passkey \
  --decode-tokens 1024 --decode-prefill 512 --lengths 1024 2048 --out eval/results/kv-smollm2 "$@"
attnpatch eval --methods streaming:budget=256,sinks=4 streaming:budget=256,sinks=0 --metrics decode_ppl \
  --decode-tokens 2048 --decode-prefill 64 --out eval/results/streaming-check-smollm2 "$@"
