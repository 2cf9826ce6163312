"""`python -m windowpipe`: the same as the `windowpipe` console script."""

from windowpipe.cli import main

main()
