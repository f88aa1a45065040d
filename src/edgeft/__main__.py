"""`python -m edgeft` runs the CLI (also what `torchrun -m edgeft` starts)."""

from edgeft.cli import main

if __name__ == "__main__":  # not when a spawned process (the bench's file makers) imports it
    main()
