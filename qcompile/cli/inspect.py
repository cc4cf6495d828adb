"""`qcompile inspect`: what a model holds."""

from __future__ import annotations

import click
from rich.table import Table

from qcompile import modelio
from qcompile.cli.common import emit_json, handle_errors, resolve_model, stdout


@click.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@handle_errors
def inspect(model: str, as_json: bool) -> None:
    """Opsets, inputs/outputs, op histogram, parameters, bytes and external data of MODEL."""
    from qcompile.inspect import summarize

    path = resolve_model(model)
    summary = summarize(modelio.load(path), path)
    if as_json:
        emit_json(summary)
        return
    stdout.print(f"[bold]{path}[/bold]  ir_version {summary['ir_version']}  producer {summary['producer']}")
    stdout.print("opsets: " + ", ".join(f"{d} {v}" for d, v in summary["opsets"].items()))
    table = Table("", "name", "dtype", "shape")
    for kind in ("inputs", "outputs"):
        for item in summary[kind]:
            table.add_row(kind[:-1], item["name"], str(item["dtype"]), str(item["shape"]))
    stdout.print(table)
    stdout.print(
        f"nodes {summary['nodes']}  parameters {summary['parameters']:,}  "
        f"initializer bytes {summary['initializer_bytes']:,}  external tensors {summary['external_data']['tensors']}"
    )
    ops = Table("op", "count")
    for op, count in summary["op_histogram"].items():
        ops.add_row(op, str(count))
    stdout.print(ops)
