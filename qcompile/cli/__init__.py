"""The `qcompile` command line: click only, one module per command; the only place that prints or exits.

Exit codes and error handling: ``qcompile.cli.common``.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from qcompile import interrupts
from qcompile.cli import analyze, bench, compare, compile, demo, gate, inspect, optimize, quantize, sweep, zoo

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qcompile-onnx", prog_name="qcompile")
@click.option("--debug", is_flag=True, help="Show the traceback of any error.")
@click.option("--custom-op-library", "custom_ops", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="ONNX Runtime custom-op library for a custom domain in the model (repeatable).")
def main(debug: bool, custom_ops: tuple[str, ...]) -> None:
    """qcompile — an ONNX graph-rewriting compiler with verified passes and measured results.

    Exit codes: 0 success, 1 a check you asked for failed, 2 your input or usage is wrong, 3 a qcompile bug."""
    interrupts.install()
    if debug:
        os.environ["QCOMPILE_DEBUG"] = "1"
    if custom_ops:
        from qcompile.runtimes.ort import CUSTOM_OP_LIBRARIES_ENV

        os.environ[CUSTOM_OP_LIBRARIES_ENV] = os.pathsep.join(str(Path(p).resolve()) for p in custom_ops)


# attributes of this package stay the modules (qcompile.cli.quantize is the module, its command is .quantize)
for command in (inspect.inspect, optimize.optimize, bench.bench, compare.compare, quantize.quantize,
                compile.compile_, gate.gate, analyze.analyze, sweep.sweep, zoo.zoo, demo.demo):
    main.add_command(command)
del command
