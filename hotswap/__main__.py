"""``python -m hotswap``: the CLI."""

from .cli import run

run()
