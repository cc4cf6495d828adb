from qcompile.cli import main

main(prog_name="qcompile")
