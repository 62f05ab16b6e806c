from studies.cli import main

main(prog_name="vaegen")
