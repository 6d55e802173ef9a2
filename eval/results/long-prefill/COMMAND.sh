# Regenerates eval/results/long-prefill/ from the repository root (or: python -m eval run long-prefill).
# Results README ('4k-32k from long_prefill.py, 64k and 128k from --lengths 65536 131072, merged with
# --merge') + 'commands' in prefill.json. the recorded first command is plain `--out out/lp`, but the
# merged file holds only 4k-32k from it (--merge concatenates rows, so a full default run would
# duplicate 64k/128k); ~1 h+ on 2 cores.
python eval/benchmarks/long_prefill.py --lengths 4096 8192 16384 32768 --out out/lp
python eval/benchmarks/long_prefill.py --lengths 65536 131072 --out out/lp2
python eval/benchmarks/long_prefill.py --merge out/lp/prefill.json out/lp2/prefill.json --out eval/results/long-prefill
