"""`accelerate launch -m generator ...` on every process:

    accelerate launch ... -m generator --dm DIR --scale K --out DIR     # `vaegen generate` (shards)
    accelerate launch ... -m generator dm train --dataset ...          # `vaegen dm train` (multi-GPU DM training)
"""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["dm"]:
        from generator.cli import dm

        dm(args=sys.argv[2:], prog_name="python -m generator dm")
    else:
        from generator.generate import generate

        generate(prog_name="python -m generator")
