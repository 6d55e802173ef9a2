# Regenerates eval/results/tokens-vision-diffusion/ from the repository root (or: python -m eval run tokens-vision-diffusion).
# Docstring + argparse default (vit clip dit pixart); the committed rows and grid_pixart1024.png also
# need pixart1024, which is not in the defaults, and the script keeps earlier rows of other models.
# Vit/clip were re-run last (commit bd06f2e, 2 threads).
python eval/benchmarks/tokens_vision_diffusion.py --out eval/results/tokens-vision-diffusion
python eval/benchmarks/tokens_vision_diffusion.py --models pixart1024 --out eval/results/tokens-vision-diffusion
