# Regenerates eval/results/main-job/ from the repository root (or: python -m eval run main-job).
# Root README + commit 8131633: `attnpatch compare` with defaults (methods and settings in
# compare.json equal the defaults; WikiText-2 found locally); the default --out is attnpatch-compare,
# so --out is given.
attnpatch compare --out eval/results/main-job
