# Regenerates eval/results/block-topk-query-pooling/ from the repository root (or: python -m eval run block-topk-query-pooling).
# Shell file writes all of it (ppl-2048/4096/8192, perplexity.md via sparse_quality_table.py,
# passkey/); results README + commit c2eccd4.
bash eval/runs/run_query_pooling_smollm2.sh
