"""`python -m lite_sft ...` runs the CLI (also what `torchrun -m lite_sft tune` starts)."""

from .cli import main

main()
