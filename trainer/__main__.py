"""`python -m trainer ...` and `accelerate launch -m trainer ...`: the `vaegen train` command."""

from trainer.cli import train
from vaegen.interrupts import run_command

if __name__ == "__main__":
    run_command(train, "python -m trainer")
