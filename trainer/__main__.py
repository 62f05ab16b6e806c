"""`python -m trainer ...` and `accelerate launch -m trainer ...`: the `vaegen train` command."""

from trainer.cli import train

train(prog_name="python -m trainer")
