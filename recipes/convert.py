"""Entry point of the conversion recipes:

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/convert.py recipes/smollm2_lolcats.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/convert.py recipes/llama3_8b_lolcats.yaml

Override any field with --set, e.g. --set stage1.steps=20 --set output_dir=out/try.
"""

from attnpatch.recipes.train import main

if __name__ == "__main__":
    main()
