"""`python -m bench.corpus build|serve ...` (bench/corpus/cli.py)."""

from .cli import main

main()
