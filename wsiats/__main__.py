"""`python -m wsiats` (and `torchrun -m wsiats`) runs the command-line interface."""

from __future__ import annotations

from wsiats.cli import cli

if __name__ == "__main__":
    cli()
