"""Architecture rules, checked by parsing imports: runtimes stand alone; passes do no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(folder: str) -> dict[str, set[str]]:
    found = {}
    for path in (ROOT / folder).glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        found[path.name] = names
    return found


def test_runtimes_import_neither_passes_nor_core():
    for name, modules in imported_modules("runtimes").items():
        bad = {m for m in modules if m.startswith("qcompile") and not m.startswith("qcompile.runtimes")}
        assert not bad, f"runtimes/{name} imports {bad}"


def test_passes_do_no_file_io_and_run_no_runtime():
    forbidden = ("qcompile.modelio", "qcompile.execute", "qcompile.runtimes", "qcompile.cli", "onnxruntime", "qcompile.models")
    for name, modules in imported_modules("passes").items():
        bad = {m for m in modules if m.startswith(forbidden)}
        assert not bad, f"passes/{name} imports {bad}"
        source = (ROOT / "passes" / name).read_text()
        assert "open(" not in source, f"passes/{name} opens files"
