"""`qcompile quantize`: a recipe applied, verified and timed against FP32."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import click
import onnx_ir as ir

from qcompile import decoder, genai, modelio, specs, targets
from qcompile.cli.common import (
    calibration_samples,
    check_output_path,
    commit_saved,
    data_feeds,
    data_option,
    emit_json,
    fail,
    handle_errors,
    output_temp_dir,
    resolve_model,
    stderr,
    stdout,
    with_shape_options,
)
from qcompile.evaluators import METRIC_HELP
from qcompile.executor import EXECUTORS
from qcompile.kv_cache import KV_CACHES
from qcompile.recipes import (
    ALGORITHMS,
    BITS,
    BLOCK_SIZES,
    DEFAULT_ACCURACY_BUDGET,
    DEFAULT_MIN_SQNR_DB,
    FORMATS,
    METHODS,
    PRESETS,
)
from qcompile.targets import HIGH_PRECISIONS, PRECISIONS


@click.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the quantized model.")
@click.option("--target", type=click.Choice(targets.names()), default=None,
              help="Where the model will run (qcompile.targets): what is quantized, how, and what it is verified "
                   "on. [default: the recipe's, ort-cpu]")
@click.option("--recipe", "recipe_name", default=None, help=" | ".join(PRESETS) + " [default: int8]")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="What the quantized part runs in (fp32/fp16/bf16: nothing quantized); without --recipe it "
                   "picks the recipe: fp16 -> fp16, int8 -> int8, fp8 -> fp8, int4 -> w4-weight-only.")
@click.option("--high-precision", type=click.Choice(HIGH_PRECISIONS), default=None,
              help="What the unquantized part runs in [default: the target's: fp16 on GPU targets, fp32 on CPU; "
                   "fp32 gives the same Q/DQ in a graph ORT CPU scores natively].")
@click.option("--recipe-file", type=click.Path(dir_okay=False), default=None, help="Load the recipe from TOML.")
@click.option("--save-recipe", type=click.Path(dir_okay=False), default=None, help="Write the resolved recipe as TOML.")
@click.option("--calib", "calib", default=None, metavar="SPEC",
              help="random | FILE.npz (samples stacked) | FOLDER of .npz | module:callable | zoo:NAME")
@click.option("--method", type=click.Choice(METHODS), default=None,
              help="Calibration method (static INT8; recipe default mse).")
@click.option("--per-channel/--per-tensor", default=None,
              help="Weight scales per output channel (default per channel).")
@click.option("--alpha", default=None, metavar="ALPHA|auto", help="SmoothQuant alpha in [0, 1], or auto (per layer).")
@click.option("--quantize-attention", is_flag=True, default=False,
              help="Static INT8: attention MatMuls (activation x activation) in INT8 too (float by default).")
@click.option("--bits", type=click.Choice([str(b) for b in BITS]), default=None, help="Weight-only bits.")
@click.option("--block-size", type=click.Choice([str(b) for b in BLOCK_SIZES]), default=None,
              help="Weight-only block size.")
@click.option("--algorithm", type=click.Choice(ALGORITHMS), default=None, help="Weight-only algorithm.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Weight-only lowering: ORT MatMulNBits, or blocked DequantizeLinear (opset 21).")
@click.option("--asymmetric", is_flag=True, default=False, help="Weight-only: asymmetric blocks (zero points).")
@click.option("--include-lm-head", is_flag=True, default=False, help="Weight-only: quantize the LM head too.")
@click.option("--include-embeddings", is_flag=True, default=False,
              help="Weight-only: quantize embedding tables (Gather) too, symmetric blocks along each row.")
@click.option("--kv-cache", type=click.Choice(KV_CACHES), default=None,
              help="A fused decoder's KV cache in fp16 or int8 (per-channel scales from --calib) [default: fp32].")
@click.option("--lm-head-bits", type=click.Choice(["4", "8"]), default=None,
              help="Weight-only with --include-lm-head: the LM head (and an embedding table tied to it) in these bits, "
                   "e.g. 8 under a W4 recipe.")
@click.option("--lm-head-block", "lm_head_block", type=click.Choice([str(b) for b in BLOCK_SIZES]), default=None,
              help="Weight-only with --include-lm-head: the LM head (and a tied table) in these blocks, e.g. 32 "
                   "under --block-size 128.")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
              help="MatMulNBits compute: 0 float, 4 int8 activations (default: the faster on this CPU, measured).")
@click.option("--exclude", multiple=True, metavar="NODE_OR_OPTYPE",
              help="Keep float: node name, op type or name pattern.")
@click.option("--samples", type=click.IntRange(min=1), default=None, help="Calibration samples at most.")
@click.option("--min-sqnr", type=float, default=None,
              help="Static recipes: choose what stays float by a per-node guard instead of the accuracy budget: "
                   f"MatMul/Gemm whose INT8 output SQNR (dB) is lower stay float (the guard where no budget can be "
                   f"measured: {DEFAULT_MIN_SQNR_DB:g}, w8a8-smoothquant 34); negative: neither, all INT8.")
@click.option("--min-speedup", type=float, default=None, help="Exit 1 (writing nothing) if not this much faster.")
@click.option("--runs", type=click.IntRange(min=1), default=None,
              help="Timed runs per model for the speed check (default: at least 2, up to 20, within about 0.5 s).")
@with_shape_options
@data_option
@click.option("--accuracy-budget", type=float, default=None, metavar="X",
              help="Static recipes: plan everything quantizable, then keep layers float until --metric on "
                   f"held-out data is at most X worse than FP32 (0.01 = 1 %) [default: {DEFAULT_ACCURACY_BUDGET:g}, "
                   "measured where there is held-out data, else the --min-sqnr guard; asked for, candidates are "
                   "timed too].")
@click.option("--metric", "metric_name", default=None, metavar="NAME",
              help=f"The budget's metric [default: perplexity for a causal LM, else cosine]: {METRIC_HELP}")
@click.option("--budget-data", default=None, metavar="SPEC",
              help="Held-out inputs for the budget (never the evaluation set) [default: with --calib zoo:NAME, "
                   "that entry's held-out split; else every 4th calibration sample, held out of calibration, from "
                   "16 samples up].")
@click.option("--budget-samples", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--budget-trials", type=click.IntRange(min=1), default=12, show_default=True,
              help="Candidates evaluated at most.")
@click.option("--budget-seconds", type=float, default=1800.0, show_default=True, help="Search time at most.")
@click.option("--executor", "executor_spec", default="inprocess", show_default=True, metavar="SPEC",
              help="Where candidates are evaluated: " + " | ".join(EXECUTORS))
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="Write a report (.md or .html): the budget search, precision per op type, environment.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@handle_errors
def quantize(model, output, target, recipe_name, precision, high_precision, recipe_file, save_recipe, calib, method,
             per_channel, alpha,
             quantize_attention, bits, block_size, algorithm, fmt, asymmetric, include_lm_head, include_embeddings,
             kv_cache, lm_head_bits, lm_head_block, accuracy_level, exclude, samples, min_sqnr, min_speedup, runs,
             batch, seq, dims, data,
             accuracy_budget, metric_name, budget_data, budget_samples, budget_trials, budget_seconds, executor_spec,
             report, as_json):
    """Quantize MODEL with a recipe (static INT8 by default), then time it against FP32 on TARGET."""
    from qcompile.calibration import resolve_reader
    from qcompile.errors import CheckFailedError
    from qcompile.memory import PhaseClock, peak_rss_mb, process_seconds
    from qcompile.passmanager import VerifyOptions
    from qcompile.recipes import PRECISION_PRESETS, Recipe, preset, with_precision

    clock = PhaseClock()  # the command's own phases; the quantizer reports its own in between
    startup = {"startup": process_seconds()}, {"startup": peak_rss_mb()}  # interpreter, imports, arguments

    base = Recipe.load(recipe_file) if recipe_file else preset(recipe_name or PRECISION_PRESETS.get(precision, "int8"))
    recipe = with_precision(base, precision).with_(high_precision=high_precision, target=target)
    recipe = recipe.with_(
        method=method, per_channel=per_channel, smoothquant=_parse_alpha(alpha), bits=int(bits) if bits else None,
        block_size=int(block_size) if block_size else None, algorithm=algorithm, format=fmt, samples=samples,
        symmetric=False if asymmetric else None, include_lm_head=True if include_lm_head else None,
        include_embeddings=True if include_embeddings else None, accuracy_level=accuracy_level,
        lm_head_bits=int(lm_head_bits) if lm_head_bits else None, kv_cache=kv_cache,
        lm_head_block_size=int(lm_head_block) if lm_head_block else None,
        quantize_attention=True if quantize_attention else None, target=target,
        exclude=tuple(dict.fromkeys([*base.exclude, *exclude])) if exclude else None,
    )
    target = recipe.target
    if min_sqnr is not None and accuracy_budget is not None:
        raise click.UsageError("--min-sqnr and --accuracy-budget are two ways to choose what stays float: give one")
    asked = {}
    if min_sqnr is not None:
        asked["min_sqnr_db"] = min_sqnr if min_sqnr >= 0 else None  # negative: off
    if accuracy_budget is not None:
        asked["accuracy_budget"] = accuracy_budget
    recipe = recipe.choosing_float(**asked)
    recipe.validate()
    path = resolve_model(model)
    out = Path(output)
    check_output_path(out, path)
    source = modelio.load(path)
    read_by_input = {Path(v.const_value.path).resolve() for v in source.graph.initializers.values()
                     if isinstance(v.const_value, ir.ExternalTensor)}  # before quantizing (in place)
    shape = {"dims": specs.parse_dims(dims), "batch": batch, "seq": seq}
    input_specs = specs.input_specs(source)
    reader = resolve_reader(calib, input_specs, recipe.samples, **shape) if calib else None
    verify_feeds = data_feeds(data, source, limit=4) or calibration_samples(calib, input_specs, 2, shape)
    verify_options = VerifyOptions(each_pass=False, feeds=verify_feeds, dims=shape["dims"], batch=batch, seq=seq)
    executor = None
    budget = None
    if accuracy_budget is not None or (recipe.kind == "static-int8" and recipe.accuracy_budget is not None):
        from qcompile.executor import make_executor

        executor = make_executor(executor_spec)
        budget = _budget_spec(recipe.accuracy_budget, metric_name, budget_data or _heldout_of(calib), input_specs,
                              budget_samples, budget_trials, budget_seconds, executor, source,
                              required=accuracy_budget is not None)
    elif metric_name or budget_data:
        raise click.UsageError("--metric and --budget-data go with an accuracy budget (--accuracy-budget, or a "
                               "static recipe's own)")
    clock.lap("read")
    from qcompile.pipeline import Pipeline

    try:
        result = Pipeline(recipe).run(source, reader, verify_options=verify_options, guard_runs=runs or "auto",
                                      budget=budget)
    finally:
        if executor is not None:
            executor.close()
    searched = getattr(result, "budget", None)
    if searched is not None and searched.spec.required:  # asked for: a check, with its log and closest model
        _write_budget_outputs(result, out, report)
        if not searched.met:
            from qcompile.errors import CheckFailedError

            closest = _closest_path(out)
            modelio.save(result.model, closest)
            best = result.budget.best
            fail(CheckFailedError(
                f"the accuracy budget {accuracy_budget:g} on {searched.spec.metric.name} cannot be met within "
                f"{len(result.budget.trials)} trials ({result.budget.stopped or 'every layer tried'}): the closest "
                f"candidate keeps {best.kept_float} layers float, drop {best.drop}",
                fix=f"{out} not written; the closest is {closest}, the search log {_log_path(out)}"))
    elif report:
        _write_budget_outputs(result, out, report, log=False)
    timing = result.latency
    clock.skip()  # the pipeline's own phases account for that
    for note in result.notes:
        stderr.print(f"note: {note}")
    serving = targets.get(target).runtime
    untimed = _untimed_reason(serving) if timing is None else None
    if untimed and min_speedup is not None:
        from qcompile.errors import RuntimeUnavailableError

        fail(RuntimeUnavailableError(f"--min-speedup needs {target}'s runtime here: {untimed}",
                                     fix="nothing was written; run on a machine with it, or drop --min-speedup"))
    with contextlib.ExitStack() as stack:
        candidate = None
        if timing is None and not untimed:  # time the saved model side by side with the input, then rename it
            candidate = Path(stack.enter_context(output_temp_dir(out))) / out.name
            modelio.save(result.model, candidate)
            clock.lap("save")
            timing = _side_by_side(path, candidate, serving, runs, shape,
                                   result.timing_feed if not (dims or batch or seq) else None)
        elif timing is not None:
            for entry, where in zip(timing["results"], (path, out)):
                entry["path"] = str(where)
        clock.lap("speed_guard")
        speedup = timing["results"][1]["speedup_vs_baseline"] if timing else None
        report = {"recipe": dataclasses.asdict(recipe), **result.to_json(), "output": str(out), "latency": timing,
                  "speedup": speedup, "not_timed": untimed}
        if min_speedup is not None and speedup < min_speedup:
            if as_json:
                emit_json({**report, **_phases(startup, result, clock), "written": False})
            fail(CheckFailedError(f"the quantized model is {speedup:.2f}x FP32 on {target}, below --min-speedup "
                                  f"{min_speedup:g}", fix="nothing was written; exclude slow ops or drop the gate"))
        if candidate is not None:
            commit_saved(candidate, out, read_by_input)
        else:
            modelio.save(result.model, out)
        genai.write_beside(result.model, out, path)  # a KV-cache decoder runs in ONNX Runtime GenAI as written
        clock.lap("save")
    report["written"] = True
    if save_recipe:  # only once the run succeeded: a failed run leaves nothing behind
        recipe.save(save_recipe)
    if as_json:
        emit_json({**report, **_phases(startup, result, clock)})
        return
    _print_quantize_summary(recipe, result, timing, speedup, target, out)


def _heldout_of(calib: str | None) -> str | None:
    """The budget's data when none is given: a zoo entry's held-out split (else, held out from
    calibration: qcompile.budget.split_calibration)."""
    if not (calib and calib.startswith("zoo:")):
        return None
    from qcompile.models import get_entry

    try:
        return calib if get_entry(calib[4:]).heldout is not None else None
    except KeyError:
        return None  # resolve_reader says so, with the zoo's names


def _budget_spec(max_drop, metric_name, data, input_specs, samples, trials, seconds, executor, source, *,
                 required: bool):
    """The budget asked for (``required``: --accuracy-budget) or the recipe's own: on ``data``, or
    (None) held out from calibration; candidates timed only when asked for (the default is chosen by
    accuracy alone: the same inputs give the same bytes)."""
    from qcompile.budget import BudgetSpec, default_metric
    from qcompile.calibration import iter_feeds, resolve_reader
    from qcompile.errors import InputSpecError
    from qcompile.evaluators import parse_metric

    names = {spec.name for spec in input_specs}
    metric = parse_metric(metric_name or default_metric(names, {v.name for v in source.graph.outputs}))
    from qcompile.gate import Thresholds

    Thresholds(max_drop=max_drop).validate(metric)  # sqnr has no relative drop
    if metric.kind == "task":
        raise InputSpecError(f"{metric.name} is measured on the evaluation set: a budget tuned on it is no budget",
                             where="--metric", fix="use cosine, perplexity, top1 or your own module:function on "
                                                   "--budget-data")
    common = dict(max_trials=trials, max_seconds=seconds, executor=executor, required=required,
                  timing_runs=BudgetSpec.timing_runs if required else 0, heldout_samples=samples)
    if data is None:
        return BudgetSpec(metric, max_drop, **common)
    feeds = list(iter_feeds(resolve_reader(data, input_specs, samples, heldout=True), input_specs, samples))
    return BudgetSpec(metric, max_drop, feeds, data=data + (" (held-out split)" if data.startswith("zoo:") else ""),
                      **common)


def _log_path(out: Path) -> Path:
    return out.with_name(out.name + ".budget.json")


def _closest_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.closest{out.suffix or '.onnx'}")


def _write_budget_outputs(result, out: Path, report: str | None, *, log: bool = True) -> None:
    """The search log (beside the output: for a budget asked for) and the report."""
    import json
    import shlex
    import sys

    budget = getattr(result, "budget", None)
    if budget is not None and log:
        modelio.write_text(_log_path(out), json.dumps(budget.to_json(), indent=1, default=str))
    if report:
        from qcompile.report import environment, precision_by_op, write_report

        data = {"title": f"qcompile quantize: {out.name}", "command": shlex.join(["qcompile", *sys.argv[1:]]),
                "summary": [["recipe", result.recipe.name], ["target", result.target], ["output", str(out)]],
                "precision_by_op": precision_by_op(result.model), "environment": environment()}
        if budget is not None:
            data["summary"] += [["budget", f"{budget.spec.metric.name} drop <= {budget.spec.max_drop:g}"],
                                ["met", "yes" if budget.met else "NO"],
                                ["layers kept float", f"{budget.best.kept_float} of {budget.layers}"]]
            data.update(budget.report_data())
        write_report(report, data)


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



def _untimed_reason(runtime: str) -> str | None:
    """Why ``runtime`` cannot time the models here (None: it can)."""
    from qcompile.runtimes import get_runtime

    availability = get_runtime(runtime).available()
    return None if availability else availability.reason


def _side_by_side(path: Path, candidate: Path, target: str, runs: int | None, shape: dict, feed) -> dict:
    """The input and the saved candidate timed interleaved (the weight-only recipes' speed check)."""
    from qcompile.bench import GUARD_MAX_RUNS, BenchSettings, bench_models

    return bench_models([path, candidate], BenchSettings(target=target, runs=runs or GUARD_MAX_RUNS, **shape),
                        labels=["fp32", "quantized"], feed=feed)



def _print_quantize_summary(recipe, result, timing, speedup, target, out) -> None:
    result = result.details  # the recipe kind's own record
    if recipe.kind == "float":
        report = result.high_precision
        if report is not None:
            stdout.print(f"{report.high_precision}: {len(report.converted)} nodes converted, "
                         f"{len(report.kept_fp32)} kept FP32")
            for name, reason in list(report.kept_fp32.items())[:12]:
                stdout.print(f"  fp32: {name} — {reason}")
    elif recipe.kind == "weight-only":
        config = result.config  # as lowered: the target may have changed the format
        stdout.print(f"{recipe.name}: {len(result.quantized)} MatMul weights to INT{config.bits} "
                     f"(block {config.block_size}, {recipe.algorithm}, {config.format})")
    else:
        plan = result.plan
        stdout.print(f"{recipe.name}: {len(plan.quantized_nodes)} nodes to {recipe.dtype.upper()}, "
                     f"{len(plan.kept_float)} kept float "
                     f"({recipe.method}, {result.calibration.samples} samples, "
                     f"{len(plan.activations)} activation tensors)")
        for name, reason in list(plan.kept_float.items())[:12]:
            stdout.print(f"  float: {name} — {reason}")
        if len(plan.kept_float) > 12:
            stdout.print(f"  … and {len(plan.kept_float) - 12} more (see --json)")
        if result.calibration.nonfinite:
            stdout.print(f"non-finite values skipped in {len(result.calibration.nonfinite)} tensors")
    if timing is None:
        stdout.print(f"not timed: {target} runs on its own hardware, not here; time it there with "
                     f"`qcompile bench --target {target}`")
        stdout.print(f"wrote {out}")
        return
    fp32, quantized = timing["results"]
    verdict = "faster" if speedup > 1.0 else "NOT faster"
    key, how = ("min_ms", f", fastest of {fp32['runs']} and {quantized['runs']} runs timed in turn") \
        if timing.get("statistic") == "min" else ("median_ms", "")
    shapes = decoder.describe_shapes(timing["feed_shapes"])
    stdout.print(f"latency on {target} ({shapes}): FP32 {fp32[key]:.2f} ms, quantized {quantized[key]:.2f} ms "
                 f"— {speedup:.2f}x, {verdict}{how}")
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
