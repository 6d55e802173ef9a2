# Regenerates eval/results/gpu/ from the repository root (or: python -m eval run gpu).
# NEEDS A GPU (ran on one H200); results README 'On a GPU' section (wheels on an indexed machine, then
# --out $OUT/gpu on the device, copied back). results.json shows the committed run's parts got
# --budget-s 270 under an older --parallel; linear_backends.txt was hand-merged from two runs;
# profile_decode_8k.txt (first run) has no script in the repo.
bash eval/gpu/wheels.sh .whl
pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
python eval/gpu/check.py --parallel --budget-s 400 --out eval/results/gpu
mkdir -p eval/results/gpu/segments && python eval/benchmarks/segment_sweep.py --out eval/results/gpu/segments 2>&1 | tee eval/results/gpu/segments/log.txt
python eval/benchmarks/linear_backends.py > eval/results/gpu/linear_backends.txt
python eval/benchmarks/profile_prefill.py 32768 > eval/results/gpu/profile_prefill_32k.txt 2>&1
python eval/benchmarks/profile_prefill.py 131072 > eval/results/gpu/profile_prefill_128k.txt 2>&1
