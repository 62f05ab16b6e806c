"""`accelerate launch -m generator ...` on every process:

    accelerate launch ... -m generator --dm DIR --scale K --out DIR     # `vaegen generate` (shards)
    accelerate launch ... -m generator dm train --dataset ...          # `vaegen dm train` (multi-GPU DM training)
"""

import sys

from vaegen.interrupts import run_command

if __name__ == "__main__":
    if sys.argv[1:2] == ["dm"]:
        from generator.cli import dm

        run_command(dm, "python -m generator dm", sys.argv[2:])
    else:
        from generator.cli import generate

        run_command(generate, "python -m generator")
