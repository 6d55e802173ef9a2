# Regenerates eval/results/sparse-speed/ from the repository root (or: python -m eval run sparse-speed).
# Docstring + argparse default --out; settings equal the defaults. --methods added because the default
# now also runs seer_gate, which the committed run did not have. (a re-run also adds the floor rows
# added later).
python eval/benchmarks/sparse_speed.py --methods a_shape block_topk bigbird star vertical_slash --out eval/results/sparse-speed
