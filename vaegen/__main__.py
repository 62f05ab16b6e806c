# `python -m vaegen ...` (what torchrun's `-m vaegen` runs): a launcher, imported by nothing. The command group
# itself lives on the top floor (studies/cli.py); this program only starts it.
from studies.cli import main

main(prog_name="vaegen")
