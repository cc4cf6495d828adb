"""qcompile.targets — one module per deployment target, and the registry."""
