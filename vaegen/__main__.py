from vaegen.cli import main

main(prog_name="vaegen")
