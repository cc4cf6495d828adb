"""`python -m qcompile.cli`, as when the CLI was one module."""

from qcompile.cli import main

main()
