"""The `qcompile` command line.

Exit codes: 0 success; 1 a check the user asked for failed; 2 the user's input or usage is wrong;
3 qcompile itself is wrong (a bug: the pass or phase is named). One line on stderr, no traceback
unless ``--debug`` (or QCOMPILE_DEBUG=1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
from pathlib import Path

import click
import onnx_ir as ir
from rich.console import Console
from rich.table import Table

from qcompile import interrupts, modelio, specs, targets
from qcompile.errors import InputSpecError, QCompileError, UnknownNameError
from qcompile.progress import bar, stderr

stdout = Console(soft_wrap=True)


def _json_default(obj):
    if hasattr(obj, "to_json"):
        return obj.to_json()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def emit_json(data) -> None:
    """Machine-readable result on stdout (strict JSON: non-finite floats become strings)."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    click.echo(json.dumps(clean(data), indent=2, default=_json_default, allow_nan=False))


def debugging() -> bool:
    return os.environ.get("QCOMPILE_DEBUG", "") not in ("", "0")


def fail(exc: QCompileError) -> None:
    click.echo(f"error: {exc.line()}", err=True)
    sys.exit(exc.exit_code)


def handle_errors(fn):
    """Turn every failure into one line on stderr and the exit code of whose fault it is."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from qcompile.runtimes import BackendError

        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM (interrupts.Terminated): temp files are gone
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(interrupts.exit_code(exc))
        except MemoryError:
            click.echo("error: out of memory — try a smaller batch or sequence length; nothing was written", err=True)
            sys.exit(2)
        except Exception as exc:
            if debugging():
                import traceback

                traceback.print_exc()
            if isinstance(exc, QCompileError):
                fail(exc)
            if isinstance(exc, BackendError):  # a runtime refusing what the user asked it to run
                click.echo(f"error: {' '.join(str(exc).split())}", err=True)
                sys.exit(2)
            message = " ".join(str(exc).split())[:300]
            click.echo(f"error: internal error in qcompile: {type(exc).__name__}: {message} — this is a qcompile "
                       "bug: please report it with the model (rerun with --debug for the traceback); the input is "
                       "untouched and nothing was written", err=True)
            sys.exit(3)

    return wrapper


def _refuse_overwriting_input(out: Path, source: Path) -> None:
    """Checked before any work: writing over the model being read is never what the user meant."""
    if out.exists() and source.exists() and os.path.samefile(out, source):
        raise modelio.OutputPathError("refusing to overwrite the input model", where=str(out), fix="choose another -o")


def resolve_model(arg: str) -> Path:
    """A model path, or ``zoo:NAME`` for a zoo export (exported and cached on first use)."""
    if arg.startswith("zoo:"):
        from qcompile.models import cached_export, get_entry

        try:
            entry = get_entry(arg[4:])
        except KeyError as exc:
            raise UnknownNameError(str(exc.args[0]), fix="see `qcompile zoo list`") from None
        with bar(f"exporting {entry.name} (cached after the first time)"):
            return cached_export(entry)
    return Path(arg)


shape_options = [
    click.option("--batch", type=click.IntRange(min=1), default=None, help="Size of symbolic batch dims (axis 0)."),
    click.option("--seq", type=click.IntRange(min=1), default=None, help="Size of other symbolic dims."),
    click.option("--dim", "dims", multiple=True, metavar="NAME=N", help="Size of a named symbolic dim (repeatable)."),
]


def with_shape_options(fn):
    for option in reversed(shape_options):
        fn = option(fn)
    return fn


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


@main.command()
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


def data_feeds(data: str | None, model, limit: int | None = None) -> list[dict] | None:
    """Feeds from ``--data FILE.npz`` for ``model`` (validated against its inputs), or None."""
    if not data:
        return None
    from qcompile.feeds import load_npz_feeds

    return load_npz_feeds(data, specs.input_specs(model), limit=limit)


data_option = click.option("--data", type=click.Path(dir_okay=False), default=None,
                           help="Real inputs (.npz named after the inputs) for verification and timing feeds.")


@main.command()
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
    _refuse_overwriting_input(out, path)
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


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--target", default="ort-cpu", show_default=True, help="Runtime to time on.")
@with_shape_options
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True, help="Timed runs per model.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed runs first.")
@click.option("--min-time", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Keep timing at least this many seconds.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (default: runtime's).")
@data_option
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON on stdout.")
@handle_errors
def bench(models, target, batch, seq, dims, runs, warmup, min_time, threads, data, as_json):
    """Time MODELS (paths or zoo:NAME) side by side on the same feed; ratios vs the first."""
    from qcompile.bench import BenchSettings, bench_models

    paths = [resolve_model(m) for m in models]
    settings = BenchSettings(target=target, batch=batch, seq=seq, dims=specs.parse_dims(dims), runs=runs,
                             warmup=warmup, min_time_s=min_time, threads=threads)
    feeds = data_feeds(data, modelio.load(paths[0]), limit=1)
    report = bench_models(paths, settings, labels=list(models), feed=feeds[0] if feeds else None)
    if as_json:
        emit_json(report)
        return
    table = Table("model", "median ms", "p90 ms", "min ms", "mean ± sd ms", "items/s", "speed vs first")
    for r in report["results"]:
        table.add_row(r["name"], f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['min_ms']:.3f}",
                      f"{r['mean_ms']:.3f} ± {r['stdev_ms']:.3f}", f"{r['throughput']:.1f}",
                      f"{r['speedup_vs_baseline']:.3f}×")
    stdout.print(table)
    stdout.print(f"target {target}; feed {report['feed_shapes']}; {runs} interleaved runs after {warmup} warm-up")


@main.command()
@click.argument("reference")
@click.argument("candidate")
@click.option("--data", type=click.Path(dir_okay=False), default=None, help=".npz of inputs (samples stacked or single).")
@click.option("--samples", type=click.IntRange(min=1), default=4, show_default=True, help="Random feeds (or cap on --data).")
@click.option("--target", default="ort-cpu", show_default=True)
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


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the quantized model.")
@click.option("--target", type=click.Choice(targets.names()), default=None,
              help="Where the model will run (qcompile.targets): what is quantized, how, and what it is verified "
                   "on. [default: the recipe's, ort-cpu]")
@click.option("--recipe", "recipe_name", default="int8", show_default=True,
              help="int8 | w8a8-smoothquant | w8-weight-only | w4-weight-only")
@click.option("--recipe-file", type=click.Path(dir_okay=False), default=None, help="Load the recipe from TOML.")
@click.option("--save-recipe", type=click.Path(dir_okay=False), default=None, help="Write the resolved recipe as TOML.")
@click.option("--calib", "calib", default=None, metavar="SPEC",
              help="random | FILE.npz (samples stacked) | FOLDER of .npz | module:callable | zoo:NAME")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy", "mse"]), default=None,
              help="Calibration method (static INT8; recipe default mse).")
@click.option("--per-channel/--per-tensor", default=None, help="Weight scales per output channel (default per channel).")
@click.option("--alpha", default=None, metavar="ALPHA|auto", help="SmoothQuant alpha in [0, 1], or auto (per layer).")
@click.option("--quantize-attention", is_flag=True, default=False,
              help="Static INT8: attention MatMuls (activation x activation) in INT8 too (float by default).")
@click.option("--bits", type=click.Choice(["4", "8"]), default=None, help="Weight-only bits.")
@click.option("--block-size", type=int, default=None, help="Weight-only block size (32/64/128).")
@click.option("--algorithm", type=click.Choice(["rtn", "gptq", "awq"]), default=None, help="Weight-only algorithm.")
@click.option("--format", "fmt", type=click.Choice(["matmulnbits", "dq"]), default=None,
              help="Weight-only lowering: ORT MatMulNBits, or blocked DequantizeLinear (opset 21).")
@click.option("--asymmetric", is_flag=True, default=False, help="Weight-only: asymmetric blocks (zero points).")
@click.option("--include-lm-head", is_flag=True, default=False, help="Weight-only: quantize the LM head too.")
@click.option("--include-embeddings", is_flag=True, default=False,
              help="Weight-only: quantize embedding tables (Gather) too, symmetric blocks along each row.")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
              help="MatMulNBits compute: 0 float, 4 int8 activations (default: the faster on this CPU, measured).")
@click.option("--exclude", multiple=True, metavar="NODE_OR_OPTYPE", help="Keep float: node name, op type or name pattern.")
@click.option("--samples", type=click.IntRange(min=1), default=None, help="Calibration samples at most.")
@click.option("--min-sqnr", type=float, default=None,
              help="Static INT8: MatMul/Gemm whose INT8 output SQNR (dB) is lower stay float (28); negative disables.")
@click.option("--min-speedup", type=float, default=None, help="Exit 1 (writing nothing) if not this much faster.")
@click.option("--runs", type=click.IntRange(min=1), default=None,
              help="Timed runs per model for the speed check (default: at least 2, up to 20, within about 0.5 s).")
@with_shape_options
@data_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@handle_errors
def quantize(model, output, target, recipe_name, recipe_file, save_recipe, calib, method, per_channel, alpha,
             quantize_attention, bits, block_size, algorithm, fmt, asymmetric, include_lm_head, include_embeddings, accuracy_level, exclude, samples, min_sqnr, min_speedup, runs,
             batch, seq, dims, data, as_json):
    """Quantize MODEL with a recipe (static INT8 by default), then time it against FP32 on TARGET."""
    from qcompile.calibration import resolve_reader
    from qcompile.errors import CheckFailedError
    from qcompile.memory import PhaseClock, peak_rss_mb, process_seconds
    from qcompile.passmanager import VerifyOptions
    from qcompile.recipes import Recipe, preset

    clock = PhaseClock()  # the command's own phases; the quantizer reports its own in between
    startup = {"startup": process_seconds()}, {"startup": peak_rss_mb()}  # interpreter, imports, arguments

    base = Recipe.load(recipe_file) if recipe_file else preset(recipe_name)
    recipe = base.with_(
        method=method, per_channel=per_channel, smoothquant=_parse_alpha(alpha), bits=int(bits) if bits else None,
        block_size=block_size, algorithm=algorithm, format=fmt, samples=samples,
        symmetric=False if asymmetric else None, include_lm_head=True if include_lm_head else None,
        include_embeddings=True if include_embeddings else None, accuracy_level=accuracy_level,
        quantize_attention=True if quantize_attention else None, target=target,
        exclude=tuple(dict.fromkeys([*base.exclude, *exclude])) if exclude else None,
    )
    target = recipe.target
    if min_sqnr is not None:  # negative turns the guard off (None), which with_() cannot express
        recipe = dataclasses.replace(recipe, min_sqnr_db=min_sqnr if min_sqnr >= 0 else None)
    recipe.validate()
    path = resolve_model(model)
    out = Path(output)
    _refuse_overwriting_input(out, path)
    source = modelio.load(path)
    read_by_input = {Path(v.const_value.path).resolve() for v in source.graph.initializers.values()
                     if isinstance(v.const_value, ir.ExternalTensor)}  # before quantizing (in place)
    shape = {"dims": specs.parse_dims(dims), "batch": batch, "seq": seq}
    input_specs = specs.input_specs(source)
    reader = resolve_reader(calib, input_specs, recipe.samples, **shape) if calib else None
    verify_feeds = data_feeds(data, source, limit=4) or _calibration_samples(calib, input_specs, 2, shape)
    verify_options = VerifyOptions(each_pass=False, feeds=verify_feeds, dims=shape["dims"], batch=batch, seq=seq)
    clock.lap("read")
    from qcompile.pipeline import Pipeline

    result = Pipeline(recipe).run(source, reader, verify_options=verify_options, guard_runs=runs or "auto")
    timing = result.latency
    clock.skip()  # the pipeline's own phases account for that
    for note in result.notes:
        stderr.print(f"note: {note}")
    with contextlib.ExitStack() as stack:
        candidate = None
        if timing is None:  # time the saved model side by side with the input (interleaved), then rename it
            candidate = Path(stack.enter_context(_output_temp_dir(out))) / out.name
            modelio.save(result.model, candidate)
            clock.lap("save")
            timing = _side_by_side(path, candidate, target, runs, shape, result.timing_feed if not (dims or batch or seq) else None)
        else:
            for entry, where in zip(timing["results"], (path, out)):
                entry["path"] = str(where)
        clock.lap("speed_guard")
        speedup = timing["results"][1]["speedup_vs_baseline"]
        report = {"recipe": dataclasses.asdict(recipe), **result.to_json(), "output": str(out), "latency": timing,
                  "speedup": speedup}
        if min_speedup is not None and speedup < min_speedup:
            if as_json:
                emit_json({**report, **_phases(startup, result, clock), "written": False})
            fail(CheckFailedError(f"the quantized model is {speedup:.2f}x FP32 on {target}, below --min-speedup "
                                  f"{min_speedup:g}", fix="nothing was written; exclude slow ops or drop the gate"))
        if candidate is not None:
            _commit(candidate, out, read_by_input)
        else:
            modelio.save(result.model, out)
        clock.lap("save")
    report["written"] = True
    if save_recipe:  # only once the run succeeded: a failed run leaves nothing behind
        recipe.save(save_recipe)
    if as_json:
        emit_json({**report, **_phases(startup, result, clock)})
        return
    _print_quantize_summary(recipe, result, timing, speedup, target, out)


def _phases(startup: tuple[dict, dict], result, clock) -> dict:
    """Every phase of a quantize run, the command's and the quantizer's, in order (seconds, and
    the process's peak RSS at the end of each)."""
    seconds = {**startup[0], "read": clock.seconds.get("read", 0.0)}
    peaks = {**startup[1], "read": clock.peak_rss_mb.get("read", 0.0)}
    for name, value in getattr(result, "phase_seconds", {}).items():
        seconds[name] = seconds.get(name, 0.0) + value
        peaks[name] = max(peaks.get(name, 0.0), result.phase_peak_rss_mb.get(name, 0.0))
    for name, value in clock.seconds.items():
        if name != "read":
            seconds[name] = seconds.get(name, 0.0) + value
            peaks[name] = max(peaks.get(name, 0.0), clock.peak_rss_mb[name])
    return {"phase_seconds": {k: round(v, 3) for k, v in seconds.items()},
            "phase_peak_rss_mb": {k: round(v) for k, v in peaks.items()},
            "seconds": round(sum(seconds.values()), 3)}


def _output_temp_dir(out: Path):
    import tempfile

    return tempfile.TemporaryDirectory(dir=out.parent.resolve(), prefix=".qcompile-")


def _side_by_side(path: Path, candidate: Path, target: str, runs: int | None, shape: dict, feed) -> dict:
    """The input and the saved candidate timed interleaved (the weight-only recipes' speed check)."""
    from qcompile.bench import GUARD_MAX_RUNS, BenchSettings, bench_models

    return bench_models([path, candidate], BenchSettings(target=target, runs=runs or GUARD_MAX_RUNS, **shape),
                        labels=["fp32", "quantized"], feed=feed)


def _commit(candidate: Path, out: Path, read_by_input: set[Path]) -> None:
    """Move a model saved in the output's folder (and its data file) into place: the same renames
    that commit modelio.save, without writing it twice. ``read_by_input``: data files of the input."""
    from qcompile import interrupts

    data, final_data = candidate.with_name(f"{candidate.name}.data"), out.with_name(f"{out.name}.data")
    if data.exists() and final_data.resolve() in read_by_input:
        raise modelio.OutputPathError("refusing to overwrite external data the input model reads", where=str(final_data),
                                      fix="choose another output name")
    with interrupts.deferred():
        if data.exists():
            os.replace(data, final_data)
        os.replace(candidate, out)


def _calibration_samples(calib: str | None, input_specs, count: int, shape: dict) -> list[dict] | None:
    """The first ``count`` samples of a real calibration source, to verify on (None for random data)."""
    if not calib or calib == "random":
        return None
    from qcompile.calibration import iter_feeds, resolve_reader

    return list(iter_feeds(resolve_reader(calib, input_specs, count, **shape), input_specs, count)) or None


def _print_quantize_summary(recipe, result, timing, speedup, target, out) -> None:
    result = result.details  # the recipe kind's own record
    if recipe.kind == "weight-only":
        stdout.print(f"{recipe.name}: {len(result.quantized)} MatMul weights to INT{recipe.bits} "
                     f"(block {recipe.block_size}, {recipe.algorithm}, {recipe.format})")
    else:
        plan = result.plan
        stdout.print(f"{recipe.name}: {len(plan.quantized_nodes)} nodes to INT8, {len(plan.kept_float)} kept float "
                     f"({recipe.method}, {result.calibration.samples} samples, {len(plan.activations)} activation tensors)")
        for name, reason in list(plan.kept_float.items())[:12]:
            stdout.print(f"  float: {name} — {reason}")
        if len(plan.kept_float) > 12:
            stdout.print(f"  … and {len(plan.kept_float) - 12} more (see --json)")
        if result.calibration.nonfinite:
            stdout.print(f"non-finite values skipped in {len(result.calibration.nonfinite)} tensors")
    fp32, quantized = timing["results"]
    verdict = "faster" if speedup > 1.0 else "NOT faster"
    key, how = ("min_ms", f", fastest of {fp32['runs']} and {quantized['runs']} runs timed in turn") \
        if timing.get("statistic") == "min" else ("median_ms", "")
    stdout.print(f"latency on {target} {timing['feed_shapes']}: FP32 {fp32[key]:.2f} ms, quantized "
                 f"{quantized[key]:.2f} ms — {speedup:.2f}x, {verdict}{how}")
    stdout.print(f"wrote {out}")


def _parse_alpha(alpha: str | None) -> float | str | None:
    if alpha is None or alpha == "auto":
        return alpha
    try:
        value = float(alpha)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise click.BadParameter(f"{alpha!r} is not a number in [0, 1] or 'auto'", param_hint="--alpha")
    return value


@main.group()
def zoo() -> None:
    """The model zoo: real-weight models with their data, and speed-only builders."""


@zoo.command("list")
@click.option("--json", "as_json", is_flag=True)
def zoo_list(as_json: bool) -> None:
    """List zoo entries."""
    from qcompile.models import ZOO

    if as_json:
        emit_json([e.to_json() for e in ZOO.values()])
        return
    table = Table("name", "version", "weights", "task", "description")
    for e in ZOO.values():
        table.add_row(e.name, e.version, "real" if e.real_weights else "RANDOM", e.task, e.description)
    stdout.print(table)


def _zoo_options(entry, items: tuple[str, ...]) -> dict:
    """KEY=VALUE builder options, typed like the entry's defaults."""
    parsed = {}
    for item in items:
        key, sep, value = (part.strip() for part in item.partition("="))
        if key not in entry.default_options:
            raise UnknownNameError(f"{entry.name} has no option {key!r}",
                                   fix=f"options: {', '.join(entry.default_options) or 'none'}")
        default = entry.default_options[key]
        if not sep or (isinstance(default, int) and not (value.isdigit() and int(value) > 0)):
            raise InputSpecError(f"bad --option {item!r}", fix=f"write it as KEY=VALUE, e.g. {key}={default}")
        parsed[key] = int(value) if isinstance(default, int) else value
    return parsed


@zoo.command("export")
@click.argument("name")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the ONNX file.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Builder option, e.g. width=768 (gpt_synth) or exporter=dynamo (minilm, smollm2).")
@handle_errors
def zoo_export(name: str, output: str, options: tuple[str, ...]) -> None:
    """Export zoo model NAME (from the cache when present) to OUTPUT."""
    from qcompile.models import cached_export, get_entry

    try:
        entry = get_entry(name)
    except KeyError as exc:
        raise UnknownNameError(str(exc.args[0]), fix="see `qcompile zoo list`") from None
    parsed = _zoo_options(entry, options)
    with bar(f"exporting {name}"):
        path = cached_export(entry, parsed)
    model = modelio.load(path)
    modelio.save(model, output)
    click.echo(f"wrote {output} ({entry.description})")


@main.command()
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
    stdout.print(f"files in {out_dir}/")


if __name__ == "__main__":
    main()
