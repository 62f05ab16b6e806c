"""`python -m generator ...` / `accelerate launch -m generator ...`: the `generate` command on every process."""

from generator.generate import generate

if __name__ == "__main__":
    generate(prog_name="python -m generator")
