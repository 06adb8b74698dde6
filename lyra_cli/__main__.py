"""`python -m lyra_cli`: the same as the `lyra` command (what `torchrun -m` and `accelerate launch -m` start)."""

from lyra_cli.main import main

main()
