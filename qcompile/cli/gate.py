"""`qcompile gate`: fail the build when a candidate's accuracy or speed regresses against its reference."""

from __future__ import annotations

import shlex
import sys

import click
from rich.table import Table

from qcompile import modelio, specs
from qcompile.cli.common import emit_json, fail, handle_errors, resolve_model, stdout
from qcompile.evaluators import METRIC_HELP


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def metric_feeds(data: str | None, metric, model_path, samples: int, what: str = "--data") -> list[dict]:
    """The feeds a metric is measured on: ``data`` read as held-out data (zoo:NAME: the entry's
    held-out split), validated against the model; none for task metrics (their own evaluation set)."""
    from qcompile.calibration import iter_feeds, resolve_reader
    from qcompile.errors import InputSpecError

    if not metric.needs_data:
        return []
    if not data:
        raise InputSpecError(f"metric {metric.name!r} needs data", where=what,
                             fix="give FILE.npz, FOLDER, module:callable, zoo:NAME or 'random'")
    input_specs = specs.input_specs(modelio.load(model_path))
    return list(iter_feeds(resolve_reader(data, input_specs, samples, heldout=True), input_specs, samples))


@click.command()
@click.argument("reference")
@click.argument("candidate")
@click.option("--data", default=None, metavar="SPEC",
              help="Inputs to measure on: FILE.npz | FOLDER | module:callable | zoo:NAME (its held-out data) | random.")
@click.option("--metric", "metric_name", required=True, metavar="NAME", help=METRIC_HELP)
@click.option("--max-drop", type=float, default=None,
              help="Fail if the metric is worse than the reference's by more than this (relative: 0.01 = 1 %).")
@click.option("--min", "minimum", type=float, default=None, help="Fail if the candidate's metric is below this.")
@click.option("--max", "maximum", type=float, default=None, help="Fail if the candidate's metric is above this.")
@click.option("--max-latency-ratio", type=float, default=None,
              help="Fail if the candidate's median latency / the reference's exceeds this (timed interleaved).")
@click.option("--target", default="ort-cpu", show_default=True,
              help="Target (its serving runtime) or runtime to evaluate both models on.")
@click.option("--samples", type=click.IntRange(min=1), default=16, show_default=True, help="Feeds read from --data.")
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed runs per model for --max-latency-ratio.")
@click.option("--json", "as_json", is_flag=True, help="Print every number used as JSON on stdout.")
@click.option("--junit", type=click.Path(dir_okay=False), default=None, help="Write the checks as JUnit XML.")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Write a report (.md or .html).")
@handle_errors
def gate(reference, candidate, data, metric_name, max_drop, minimum, maximum, max_latency_ratio, target, samples,
         runs, as_json, junit, report):
    """Gate CANDIDATE against REFERENCE: exit 0 pass, 1 a threshold failed, 2 usage or input, 3 internal."""
    from qcompile import gate as gating
    from qcompile.errors import CheckFailedError
    from qcompile.evaluators import parse_metric

    metric = parse_metric(metric_name)
    thresholds = gating.Thresholds(max_drop, minimum, maximum, max_latency_ratio)
    thresholds.validate(metric)
    ref_path, cand_path = resolve_model(reference), resolve_model(candidate)
    for path in (ref_path, cand_path):
        modelio.load(path)  # a missing or invalid file is the input's error, before any work
    feeds = metric_feeds(data, metric, ref_path, samples)
    cand_specs = specs.input_specs(modelio.load(cand_path))
    for i, feed in enumerate(feeds):
        specs.validate_feed(cand_specs, feed, where=f"sample {i} for {cand_path}")
    result = gating.run_gate(ref_path, cand_path, metric, feeds, thresholds, target, runs)
    write_gate_outputs(result, junit, report)
    if as_json:
        emit_json({**result.to_json(), "junit": junit, "report": report})
    else:
        print_gate(result)
    if not result.passed:
        worst = result.failed[0]
        fail(CheckFailedError(f"gate failed: {worst.name} = {_fmt(worst.value)}, limit {worst.limit} ({worst.detail})"))


def write_gate_outputs(result, junit: str | None, report: str | None) -> None:
    """The JUnit file and the report, written whether the gate passed or not (CI shows both)."""
    from qcompile import gate as gating

    if junit:
        modelio.write_text(junit, gating.junit_xml(result))
    if report:
        from qcompile.report import environment, write_report

        data = result.report_data(shlex.join(["qcompile", *sys.argv[1:]]))
        write_report(report, {**data, "environment": environment()})


def print_gate(result) -> None:
    s = result.score
    table = Table("check", "value", "limit", "verdict", "detail")
    for check in result.checks:
        table.add_row(check.name, _fmt(check.value), check.limit, "PASS" if check.passed else "FAIL", check.detail)
    stdout.print(f"{s.metric.name}: reference {_fmt(s.reference)}, candidate {_fmt(s.candidate)}, drop "
                 f"{_fmt(s.drop)} ({s.samples} samples on {result.target})")
    if result.checks:
        stdout.print(table)
    else:
        stdout.print("no threshold given: nothing checked")
    stdout.print("PASS" if result.passed else "FAIL")
