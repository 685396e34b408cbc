"""`python -m tlpipe …` = the `tlpipe` command (what `torchrun -m tlpipe …` starts on each rank)."""

from tlpipe.cli import main

main()
