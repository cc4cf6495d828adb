"""`qcompile analyze`: which quantized layers cost accuracy, and what keeping them float buys back."""

from __future__ import annotations

import shlex
import sys

import click
from rich.table import Table

from qcompile.cli.common import emit_json, handle_errors, resolve_model, stdout
from qcompile.cli.gate import metric_feeds
from qcompile.evaluators import METRIC_HELP
from qcompile.executor import EXECUTORS


def _db(x) -> str:
    return "—" if x is None else f"{x:.1f}"


@click.command()
@click.argument("reference")
@click.argument("quantized")
@click.option("--data", required=True, metavar="SPEC",
              help="Inputs: FILE.npz | FOLDER | module:callable | zoo:NAME (its held-out data) | random.")
@click.option("--top", type=click.IntRange(min=0), default=5, show_default=True,
              help="Suspects whose end-metric change (layer, and region, kept float) is measured.")
@click.option("--metric", "metric_name", default="cosine", show_default=True, metavar="NAME", help=METRIC_HELP)
@click.option("--samples", type=click.IntRange(min=1), default=8, show_default=True, help="Feeds read from --data.")
@click.option("--target", default="ort-cpu", show_default=True, help="Where the end metric is evaluated.")
@click.option("--executor", "executor_spec", default="inprocess", show_default=True, metavar="SPEC",
              help=" | ".join(EXECUTORS))
@click.option("--json", "as_json", is_flag=True, help="Print every layer's figures as JSON.")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Write a report (.md or .html).")
@handle_errors
def analyze(reference, quantized, data, top, metric_name, samples, target, executor_spec, as_json, report):
    """Rank QUANTIZED's layers by the noise they add (SQNR vs REFERENCE's float twins), then measure the
    end metric with the worst kept float."""
    from qcompile.analyze import analyze as run_analysis
    from qcompile.evaluators import parse_metric
    from qcompile.executor import make_executor

    metric = parse_metric(metric_name)
    ref_path, q_path = resolve_model(reference), resolve_model(quantized)
    feeds = metric_feeds(data, parse_metric("cosine"), ref_path, samples)
    executor = make_executor(executor_spec)
    try:
        result = run_analysis(ref_path, q_path, feeds, metric, top=top, target=target, executor=executor)
    finally:
        executor.close()
    if report:
        from qcompile import modelio
        from qcompile.report import environment, precision_by_op, write_report

        write_report(report, {
            "title": f"qcompile analyze: {q_path.name}",
            "command": shlex.join(["qcompile", *sys.argv[1:]]),
            "summary": [["reference", str(ref_path)], ["quantized", str(q_path)], ["metric", metric.name],
                        ["reference value", result.reference_value], ["quantized value", result.quantized_value]],
            "layers": [{"tensor": ", ".join(layer.activations + layer.weights), "nodes": [layer.node],
                        "op_type": layer.op_type, "kind": "activation", "sqnr_db": layer.output_sqnr_db,
                        "local_sqnr_db": layer.local_sqnr_db, "metric_change": layer.metric_change}
                       for layer in result.layers],
            "precision_by_op": precision_by_op(modelio.load(q_path)),
            "environment": environment(),
        })
    if as_json:
        emit_json({**result.to_json(), "report": report})
        return
    table = Table("rank", "node", "op", "local dB", "act dB", "weight dB", "output dB", "Δ metric float",
                  "Δ region float")
    for rank, layer in enumerate(result.layers[:max(top, 20)], 1):
        change = "—" if layer.metric_change is None else f"{layer.metric_change:+.3g}"
        region = "—" if layer.region_metric_change is None else f"{layer.region_metric_change:+.3g}"
        node = layer.node if len(layer.node) <= 48 else "…" + layer.node[-47:]
        table.add_row(str(rank), node, layer.op_type, _db(layer.local_sqnr_db), _db(layer.activation_sqnr_db),
                      _db(layer.weight_sqnr_db), _db(layer.output_sqnr_db), change, region)
    stdout.print(table)
    if result.quantized_value is not None:
        stdout.print(f"{metric.name}: reference {result.reference_value:.6g}, quantized {result.quantized_value:.6g} "
                     f"on {len(feeds)} samples; Δ: change of the drop with the layer (region) float")
