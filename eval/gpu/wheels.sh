#!/usr/bin/env bash
# Wheels for eval/gpu/check.py on a GPU machine that reaches no package index (Python 3.12, x86-64):
# what a CUDA image with torch, accelerate, tokenizers and safetensors lacks. transformers stays at the
# tested floor (5.18.0): newer releases need huggingface_hub >= 2.4 and its own new dependencies.
#
#   bash eval/gpu/wheels.sh .whl            # here, with an index
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD   # there
set -euo pipefail
dest=${1:-.whl}
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" transformers==5.18.0 peft diffusers==0.35.2 fla-core importlib_metadata
