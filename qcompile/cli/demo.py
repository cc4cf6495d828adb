"""`qcompile demo`: MiniLM optimized, timed and scored end to end."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from qcompile.cli.common import emit_json, handle_errors, stderr, stdout


@click.command()
@click.option("--out-dir", type=click.Path(file_okay=False), default="qcompile-demo", show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def demo(out_dir: str, runs: int, as_json: bool) -> None:
    """Export MiniLM with real weights, optimize it with verification, time and score before/after."""
    from qcompile.demo import run_demo

    report = run_demo(Path(out_dir), runs=runs, log=lambda msg: stderr.print(msg))
    if as_json:
        emit_json(report)
        return
    table = Table("model", "nodes", "median ms (b1, seq 128)", "speed vs FP32", "R@1", "embedding cosine")
    for row in report["rows"]:
        table.add_row(row["model"], str(row["nodes"]), f"{row['median_ms']:.2f}", f"{row['speedup']:.3f}×",
                      f"{row['r_at_1']:.3f}", f"{row['embedding_cosine']:.6f}")
    stdout.print(table)
    gate = report["gate"]
    verdict = "PASS" if gate["passed"] else "FAIL"
    checks = ", ".join(f"{c['name']} {c['value']:.4g} ({c['limit']})" for c in gate["checks"])
    stdout.print(f"gate: {verdict} — {checks}")
    stdout.print(f"report: {gate['report']}")
    stdout.print(f"files in {out_dir}/")
