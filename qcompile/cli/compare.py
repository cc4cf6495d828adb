"""`qcompile compare`: a candidate's outputs against a reference's."""

from __future__ import annotations

import click
from rich.table import Table

from qcompile import modelio, specs
from qcompile.cli.common import emit_json, fail, handle_errors, resolve_model, stdout, with_shape_options


@click.command()
@click.argument("reference")
@click.argument("candidate")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help=".npz of inputs (samples stacked or single).")
@click.option("--samples", type=click.IntRange(min=1), default=4, show_default=True,
              help="Random feeds (or cap on --data).")
@click.option("--target", default="ort-cpu", show_default=True,
              help="Target (its serving runtime) or runtime to run both models on.")
@with_shape_options
@click.option("--max-rel-l2", type=float, default=None, help="Exit 1 if any output's relative L2 exceeds this.")
@click.option("--json", "as_json", is_flag=True, help="Print metrics as JSON on stdout.")
@handle_errors
def compare(reference, candidate, data, samples, target, batch, seq, dims, max_rel_l2, as_json):
    """Compare CANDIDATE's outputs with REFERENCE's on the same feeds."""
    from qcompile.bench import compare_models
    from qcompile.errors import CheckFailedError
    from qcompile.feeds import load_npz_feeds

    ref_path, cand_path = resolve_model(reference), resolve_model(candidate)
    ref_specs = specs.input_specs(modelio.load(ref_path))
    cand_specs = specs.input_specs(modelio.load(cand_path))
    if data:
        feeds = load_npz_feeds(data, ref_specs, limit=samples)
    else:
        from qcompile import execute
        from qcompile.feedsearch import fitting_feeds

        with execute.loaded(str(ref_path), target) as runtime:
            feeds, _ = fitting_feeds(ref_specs, lambda f: execute.run_all(runtime, [f]), samples=samples,
                                     dims=specs.parse_dims(dims), batch=batch, seq=seq)
    for i, feed in enumerate(feeds):
        specs.validate_feed(cand_specs, feed, where=f"sample {i} for {cand_path}")
    comparison = compare_models(ref_path, cand_path, feeds, target)
    passed = max_rel_l2 is None or comparison.within(max_rel_l2)
    if as_json:
        emit_json({"samples": len(feeds), "outputs": comparison.to_json(), "passed": passed, "max_rel_l2": max_rel_l2})
    else:
        table = Table("output", "max abs", "rel L2", "cosine", "SQNR dB", "top-1 agree")
        for o in comparison.outputs.values():
            top1 = "—" if o.top1 is None else f"{o.top1:.4f}"
            table.add_row(o.name, f"{o.max_abs:.3g}", f"{o.rel_l2:.3g}", f"{o.cosine:.6f}", f"{o.sqnr_db:.1f}", top1)
        stdout.print(table)
        stdout.print(f"{len(feeds)} samples on {target}")
    if not passed:
        worst = comparison.worst()
        fail(CheckFailedError(f"output {worst.name!r} rel L2 {worst.rel_l2:.3g} exceeds --max-rel-l2 {max_rel_l2:g}"))
