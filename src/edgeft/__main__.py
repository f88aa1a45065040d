"""`python -m edgeft` runs the CLI (also what `torchrun -m edgeft` starts)."""

from edgeft.cli import main

main()
