"""`qcompile optimize`: verified FP32 passes."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from qcompile import genai, modelio, specs
from qcompile.cli.common import (
    check_output_path,
    data_feeds,
    data_option,
    emit_json,
    handle_errors,
    resolve_model,
    stderr,
    stdout,
    with_shape_options,
)
from qcompile.progress import bar


@click.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the result.")
@click.option("--passes", default=None, help="Comma-separated pass names (default: the FP32 pipeline).")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check every pass numerically on ORT CPU.")
@click.option("--strict", is_flag=True, help="Exit 3 when a pass fails its check, instead of rolling it back.")
@click.option("--target-opset", type=click.IntRange(min=7), default=None, help="Convert to this opset first.")
@click.option("--tolerance", type=float, default=None,
              help="Max relative L2 error per pass (default: each pass's stated bound; 1e-5 for exact rewrites).")
@click.option("--external-data/--no-external-data", default=None, help="Weights in OUTPUT.data (default: by size).")
@with_shape_options
@data_option
@click.option("--json", "as_json", is_flag=True, help="Print per-pass stats as JSON on stdout.")
@handle_errors
def optimize(model, output, passes, verify, strict, target_opset, tolerance, external_data, batch, seq, dims, data,
             as_json):
    """Optimize MODEL with verified FP32 passes and write OUTPUT atomically."""
    from qcompile.passes import DEFAULT_PIPELINE
    from qcompile.passmanager import VerifyOptions, checked_outputs
    from qcompile.pipeline import optimize_with_stats

    path = resolve_model(model)
    names = [n.strip() for n in passes.split(",") if n.strip()] if passes else None
    out = Path(output)
    check_output_path(out, path)
    loaded = modelio.load(path)
    options = VerifyOptions(dims=specs.parse_dims(dims), batch=batch, seq=seq, rel_l2=tolerance,
                            feeds=data_feeds(data, loaded, limit=4))
    planned = len(names or DEFAULT_PIPELINE)
    with bar("optimizing", total=None) as advance:
        result = optimize_with_stats(
            loaded, names, verify=verify, verify_options=options, target_opset=target_opset, strict=strict,
            on_pass=lambda s: advance(description=f"{s.name} ({planned} passes per sweep)"),
        )
    if not verify:  # unverified passes still never write an invalid or unrunnable file
        checked_outputs(result.model, [], "the optimize pipeline")
    modelio.save(result.model, out, external_data=external_data)
    genai.write_beside(result.model, out, path)  # a KV-cache decoder runs in ONNX Runtime GenAI as written
    first, last = result.stats[0], result.stats[-1]
    summary = {
        "input": str(path),
        "output": str(out),
        "verified": verify,
        "nodes_before": first.nodes_before,
        "nodes_after": last.nodes_after,
        "initializer_bytes_before": first.initializer_bytes_before,
        "initializer_bytes_after": last.initializer_bytes_after,
        **result.to_json(),
    }
    for warning in result.warnings():
        stderr.print(f"warning: {warning}")
    if as_json:
        emit_json(summary)
        return
    table = Table("pass", "ms", "nodes", "bytes", "changed", "verified (rel L2 ≤ bound)")
    for s in result.stats:
        if s.rolled_back:
            check = "ROLLED BACK"
        else:
            check = "—" if s.verified is None else f"yes ({s.rel_l2:.1e} ≤ {s.bound:.0e})"
        table.add_row(
            s.name, f"{s.seconds * 1e3:.1f}", f"{s.nodes_before} → {s.nodes_after}",
            f"{s.initializer_bytes_before:,} → {s.initializer_bytes_after:,}", "yes" if s.modified else "", check,
        )
    stdout.print(table)
    feeds_note = f"; verified on {result.feeds}" if result.feeds else ""
    stdout.print(f"nodes {first.nodes_before} → {last.nodes_after}{feeds_note}; wrote {out}")
