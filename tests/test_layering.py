"""Architecture rules, checked by parsing every ``.py`` file (recursively) with ``ast``.

Imports are read from ``ast.Import`` and ``ast.ImportFrom`` anywhere in a module (function
bodies included); relative imports are resolved against the module's own package, and
``from X import a`` counts as importing ``X.a``. A name is allowed when it equals an allowed
prefix or starts with ``prefix + "."``.

===  ==============================  ===================================================================
#    Folder (import name)            Rule
===  ==============================  ===================================================================
1    runtimes/ (qcompile.runtimes)   imports of qcompile: only ``qcompile.runtimes.*``
2    quant/ (qcompile.quant)         imports of qcompile: only ``qcompile.quant.*``;
                                     no onnx, onnx_ir, onnxruntime, onnxscript (pure numpy)
3    passes/ (qcompile.passes)       imports of qcompile: only ``qcompile.passes.*``,
                                     ``qcompile.quant.spec``, ``qcompile.quant.dtypes``; no onnxruntime
4    targets/ (qcompile.targets)     imports of qcompile: only ``qcompile.targets.*``, ``.passes.*``,
                                     ``.quant.*``, ``.runtimes.*``, ``qcompile.errors``
5    passes/ quant/ targets/         never import ``qcompile.models`` (only the core, tools/, tests/ do);
     runtimes/; models/              models/ imports of qcompile: only ``qcompile.models.*``,
                                     ``qcompile.errors`` (never passes, quant, targets)
6    passes/, quant/                 no file I/O: no builtin ``open``, no ``.write_text/.write_bytes/
                                     .read_text/.read_bytes/.open`` calls, no ``os.replace/rename/remove``,
                                     no ``shutil.*``, no ``onnx|onnx_ir|ir.save/load``
7    qcompile/ passes/ quant/        no ``print``, ``sys.exit``, ``click.echo`` outside ``qcompile/cli.py``
     targets/ runtimes/              (or a ``qcompile/cli/`` package); ``qcompile/__main__.py`` may only
                                     call the CLI's ``main``
===  ==============================  ===================================================================
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Iterable, Iterator

ROOT = Path(__file__).resolve().parents[1]

# folder (relative to ROOT) -> import name, as in pyproject.toml [tool.setuptools] package-dir
PACKAGE_DIRS: dict[str, str] = {
    "qcompile": "qcompile",
    "passes": "qcompile.passes",
    "quant": "qcompile.quant",
    "targets": "qcompile.targets",
    "runtimes": "qcompile.runtimes",
    "models": "qcompile.models",
}

GRAPH_AND_RUNTIME_LIBS = ("onnx", "onnx_ir", "onnxruntime", "onnxscript")
#: models build and evaluate zoo entries: they may use the core's leaf utilities, never passes, quant or targets
MODELS_MAY_IMPORT = ("qcompile.models", "qcompile.errors", "qcompile.execute", "qcompile.cache", "qcompile.calibration")

IO_ATTRIBUTE_CALLS = frozenset({"write_text", "write_bytes", "read_text", "read_bytes", "open"})
IO_CALLS = frozenset(
    {
        "open",
        "io.open",
        "os.replace",
        "os.rename",
        "os.remove",
        *(f"{lib}.{verb}" for lib in ("onnx", "onnx_ir", "onnxscript.ir", "ir") for verb in ("save", "load")),
        "onnx.save_model",
        "onnx.load_model",
    }
)
IO_CALL_PREFIXES = ("shutil.",)
CLI_ONLY_CALLS = frozenset({"print", "sys.exit", "click.echo", "click.secho"})


@dataclass(frozen=True)
class Hit:
    """One offending import or call: where it is and what it names."""

    path: Path
    line: int
    name: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.name}"


@dataclass(frozen=True)
class Module:
    """A parsed source file with its dotted module name and package."""

    path: Path
    name: str
    package: str
    tree: ast.Module


def module_name(folder: str, path: Path) -> tuple[str, str]:
    """(module, package) import names of ``path`` inside ``folder``."""
    parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    name = ".".join([PACKAGE_DIRS[folder], *parts])
    return name, name if is_package else name.rpartition(".")[0]


@cache
def modules(folder: str) -> tuple[Module, ...]:
    """Every ``.py`` file under ``folder``, recursively, parsed."""
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        name, package = module_name(folder, path)
        found.append(Module(path, name, package, ast.parse(path.read_text(), filename=str(path))))
    return tuple(found)


def resolve_from(module: Module, node: ast.ImportFrom) -> str:
    """Absolute module named by ``from <...> import``, relative levels resolved."""
    if node.level == 0:
        return node.module or ""
    base = module.package.split(".")
    if node.level - 1 >= len(base):
        raise AssertionError(f"{module.path}:{node.lineno}: relative import beyond top-level package")
    anchor = base[: len(base) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def imports(module: Module) -> Iterator[Hit]:
    """Every name imported by ``module`` (``from X import a`` yields ``X.a``; ``*`` yields ``X``)."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Hit(module.path, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            source = resolve_from(module, node)
            for alias in node.names:
                yield Hit(module.path, node.lineno, source if alias.name == "*" else f"{source}.{alias.name}")


def matches(name: str, prefixes: Iterable[str]) -> bool:
    """True when ``name`` is one of ``prefixes`` or a submodule/attribute of one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def import_violations(folder: str, allowed: Iterable[str], forbidden_libs: Iterable[str] = ()) -> list[Hit]:
    """Imports in ``folder`` of qcompile outside ``allowed``, or of any ``forbidden_libs``."""
    allowed, forbidden_libs = tuple(allowed), tuple(forbidden_libs)
    return [
        hit
        for module in modules(folder)
        for hit in imports(module)
        if (matches(hit.name, ("qcompile",)) and not matches(hit.name, allowed)) or matches(hit.name, forbidden_libs)
    ]


def aliases(module: Module) -> dict[str, str]:
    """Local name -> fully qualified name, from the module's imports (``import onnx_ir as ir``)."""
    table: dict[str, str] = {}
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    table[alias.asname] = alias.name
                else:
                    head = alias.name.partition(".")[0]
                    table[head] = head
        elif isinstance(node, ast.ImportFrom):
            source = resolve_from(module, node)
            for alias in node.names:
                if alias.name != "*":
                    table[alias.asname or alias.name] = f"{source}.{alias.name}"
    return table


def dotted(expr: ast.expr) -> str | None:
    """``a.b.c`` for a Name/Attribute chain, else None (calls on calls, subscripts, ...)."""
    parts: list[str] = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if not isinstance(expr, ast.Name):
        return None
    parts.append(expr.id)
    return ".".join(reversed(parts))


def calls(module: Module) -> Iterator[tuple[ast.Call, str | None, str | None]]:
    """Every call as (node, name as written, name with its first part resolved through imports)."""
    table = aliases(module)
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Call):
            written = dotted(node.func)
            if written is None:
                yield node, None, None
                continue
            head, _, rest = written.partition(".")
            resolved = table.get(head, head) + (f".{rest}" if rest else "")
            yield node, written, resolved


def call_violations(folders: Iterable[str], names: frozenset[str], prefixes: tuple[str, ...] = ()) -> list[Hit]:
    """Calls in ``folders`` whose written or resolved name is in ``names`` or under ``prefixes``."""
    hits = []
    for folder in folders:
        for module in modules(folder):
            for node, written, resolved in calls(module):
                candidates = {n for n in (written, resolved) if n}
                if candidates & names or any(n.startswith(prefixes) for n in candidates if prefixes):
                    hits.append(Hit(module.path, node.lineno, f"{written}(...)"))
    return hits


def report(rule: str, hits: list[Hit]) -> str:
    """Failure message: the rule, then one ``file:line: name`` per offence."""
    return f"{rule}:\n  " + "\n  ".join(map(str, hits))


def test_rule1_runtimes_import_only_runtimes():
    hits = import_violations("runtimes", ["qcompile.runtimes"])
    assert not hits, report("runtimes/ may import only qcompile.runtimes.*", hits)


def test_rule2_quant_is_pure_numpy():
    hits = import_violations("quant", ["qcompile.quant"], GRAPH_AND_RUNTIME_LIBS)
    assert not hits, report("quant/ may import only qcompile.quant.* and no onnx/onnx_ir/onnxruntime/onnxscript", hits)


def test_rule3_passes_import_only_passes_and_quant_spec():
    hits = import_violations(
        "passes", ["qcompile.passes", "qcompile.quant.spec", "qcompile.quant.dtypes"], ["onnxruntime"]
    )
    assert not hits, report(
        "passes/ may import only qcompile.passes.*, qcompile.quant.{spec,dtypes}; no onnxruntime", hits)


def test_rule4_targets_import_only_lower_layers_and_errors():
    allowed = ["qcompile.targets", "qcompile.passes", "qcompile.quant", "qcompile.runtimes", "qcompile.errors"]
    hits = import_violations("targets", allowed)
    assert not hits, report(
        "targets/ may import only qcompile.{targets,passes,quant,runtimes}.*, qcompile.errors", hits)


def test_rule5_models_imported_only_by_core_and_import_no_layers():
    lower = [
        hit
        for folder in ("passes", "quant", "targets", "runtimes")
        for module in modules(folder)
        for hit in imports(module)
        if matches(hit.name, ("qcompile.models",))
    ]
    assert not lower, report("passes/, quant/, targets/, runtimes/ must not import qcompile.models", lower)
    hits = import_violations("models", MODELS_MAY_IMPORT)
    assert not hits, report(f"models/ may import of qcompile only {', '.join(MODELS_MAY_IMPORT)}", hits)


def test_rule6_passes_and_quant_do_no_file_io():
    hits = call_violations(("passes", "quant"), IO_CALLS, IO_CALL_PREFIXES)
    hits += [
        Hit(module.path, node.lineno, f"{written or '<expr>.' + node.func.attr}(...)")
        for folder in ("passes", "quant")
        for module in modules(folder)
        for node, written, _ in calls(module)
        if isinstance(node.func, ast.Attribute) and node.func.attr in IO_ATTRIBUTE_CALLS and written not in IO_CALLS
    ]
    assert not hits, report("passes/ and quant/ must do no file I/O", sorted(hits, key=str))


def is_cli(path: Path) -> bool:
    rel = path.relative_to(ROOT)
    return rel == Path("qcompile/cli.py") or rel.parts[:2] == ("qcompile", "cli")


def test_rule7_only_the_cli_prints_or_exits():
    library = ("qcompile", "passes", "quant", "targets", "runtimes")
    hits = [hit for hit in call_violations(library, CLI_ONLY_CALLS) if not is_cli(hit.path)]
    assert not hits, report("only qcompile/cli.py may print, sys.exit or click.echo", hits)
    outside = [
        Hit(module.path, node.lineno, f"{written}(...)")
        for module in modules("qcompile")
        if module.name == "qcompile.__main__"
        for node, written, resolved in calls(module)
        if resolved != "qcompile.cli.main"
    ]
    assert not outside, report("qcompile/__main__.py may only call the CLI's main", outside)
