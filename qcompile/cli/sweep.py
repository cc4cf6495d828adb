"""`qcompile sweep`: recipes x targets, quantized and measured side by side; the Pareto front reported."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click
from rich.table import Table

from qcompile import specs, targets
from qcompile.cli.common import emit_json, handle_errors, resolve_model, stdout
from qcompile.cli.gate import metric_feeds
from qcompile.evaluators import METRIC_HELP
from qcompile.executor import EXECUTORS
from qcompile.recipes import PRESETS


@click.command()
@click.argument("model")
@click.argument("recipes", nargs=-1, required=True)
@click.option("--targets", "target_list", default="ort-cpu", show_default=True, metavar="T[,T...]",
              help=f"Targets: {', '.join(targets.names())}.")
@click.option("--calib", required=True, metavar="SPEC", help="Calibration data (see `qcompile quantize --help`).")
@click.option("--samples", type=click.IntRange(min=1), default=None, help="Calibration samples at most.")
@click.option("--data", required=True, metavar="SPEC",
              help="Held-out data for the metric (zoo:NAME: its held-out split).")
@click.option("--metric", "metric_name", default="cosine", show_default=True, metavar="NAME", help=METRIC_HELP)
@click.option("--data-samples", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("-o", "--out-dir", required=True, type=click.Path(file_okay=False), help="Folder for the candidates.")
@click.option("--executor", "executor_spec", default="inprocess", show_default=True, metavar="SPEC",
              help=" | ".join(EXECUTORS))
@click.option("--json", "as_json", is_flag=True)
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Write a report (.md or .html).")
@handle_errors
def sweep(model, recipes, target_list, calib, samples, data, metric_name, data_samples, out_dir, executor_spec,
          as_json, report):
    """Quantize MODEL with each of RECIPES for each target, then measure every candidate."""
    from qcompile import modelio
    from qcompile.calibration import resolve_reader
    from qcompile.errors import UnknownNameError
    from qcompile.evaluators import parse_metric
    from qcompile.executor import make_executor
    from qcompile.sweep import run_sweep

    for recipe in recipes:
        if recipe not in PRESETS:
            raise UnknownNameError(f"unknown recipe {recipe!r}", fix="choose from: " + ", ".join(PRESETS))
    names = [t.strip() for t in target_list.split(",") if t.strip()]
    for name in names:
        targets.get(name)
    metric = parse_metric(metric_name)
    path = resolve_model(model)
    feeds = metric_feeds(data, metric, path, data_samples)
    input_specs = specs.input_specs(modelio.load(path))
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    executor = make_executor(executor_spec)
    try:
        result = run_sweep(path, list(recipes), names, lambda: resolve_reader(calib, input_specs, samples or 64),
                           folder, metric, feeds, executor)
    finally:
        executor.close()
    if report:
        from qcompile.report import environment, write_report

        write_report(report, {"title": f"qcompile sweep: {path.name}",
                              "command": shlex.join(["qcompile", *sys.argv[1:]]), **result.report_data(),
                              "environment": environment(),
                              "tables": [{"title": "candidates", "columns": ["recipe", "target", metric.name, "drop",
                                                                             "latency ms", "path", "note"],
                                          "rows": [[r.recipe, r.target, r.value, r.drop, r.latency_ms, r.path, r.note]
                                                   for r in result.rows]}]})
    if as_json:
        emit_json(result.to_json())
        return
    table = Table("recipe", "target", metric.name, "drop", "latency ms", "file")
    table.add_row("fp32", "—", f"{result.reference_value:.6g}", "0", _ms(result.reference_latency_ms), str(path))
    for r in result.rows:
        value = "—" if r.value is None else f"{r.value:.6g}"
        drop = "—" if r.drop is None else f"{r.drop:.4g}"
        table.add_row(r.recipe, r.target, value, drop, _ms(r.latency_ms), r.note or r.path)
    stdout.print(table)


def _ms(x) -> str:
    return "—" if x is None else f"{x:.3f}"
