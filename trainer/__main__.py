"""`python -m trainer ...` and `accelerate launch -m trainer ...`: the `vaegen train` command."""

from trainer.cli import train
from vaegen.interrupts import run_command

run_command(train, "python -m trainer")
