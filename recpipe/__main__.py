"""`python -m recpipe ...` runs the CLI, as the `recpipe` command does (and as `torchrun -m recpipe` needs)."""

from recpipe.cli import main

if __name__ == "__main__":
    main()
