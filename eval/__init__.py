"""attnpatch's benchmark suite.

    benchmarks/     one script per measurement (each `python eval/benchmarks/NAME.py --help`)
    gpu/            the GPU check, one module per part (check.py runs them)
    runs/           shell files that run several measurements in a row
    results/NAME/   committed outputs, each with COMMAND.sh, the commands that regenerate it
    tasks/          the local lm-eval tasks
    common.py       what the scripts share (the import path, SmolLM2 for timing, ...)

    python -m eval list              # every result and the command that regenerates it
    python -m eval run NAME          # run those commands from the repository root
    python -m eval run NAME --dry-run
"""
