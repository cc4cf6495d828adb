"""The stages every recipe shares (qcompile.pipeline.Pipeline runs them around the recipe's own).

    prepare      load -> reference (the original on the verification feeds; failure = the input's)
                 -> speed guard (FP32, in that session) -> optimize (the target's passes, checked)
    check        the result in the target's terms (checker, standard domains), run, compared with
                 the original's outputs; the lowering's stated bound (:func:`check_lowering`); the
                 speed guard times it in the same session

Every session runs the model as it will be run (graph optimizations on, pre-packed weights); one
float copy of the weights is resident at a time, so original and result are timed in turn.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import onnx_ir as ir

from qcompile import execute, memory, modelio, targets
from qcompile.bench import guard_report, time_runs
from qcompile.calibration import CalibrationReader, fit_reader
from qcompile.errors import BackendFailedError, InputModelError, QCompileError, VerificationError
from qcompile.memory import PhaseClock
from qcompile.metrics import Comparison, compare_outputs
from qcompile.passes import make_pass, quantization_pipeline
from qcompile.passmanager import VerifyOptions, choose_feeds, snapshot
from qcompile.pipeline import optimize_with_stats, prepare_float_model
from qcompile.runtimes import BackendError, Runtime, RuntimeOptions, TimingResult

#: The sessions that check the float and the quantized model run them as they will be run (graph
#: optimizations on, weights pre-packed), so that the speed guard can time them in place.
CHECK_RUNTIME = RuntimeOptions()

def require_domains(model: ir.Model, target: targets.Target) -> None:
    """A target that takes only standard ONNX refuses a model with other domains (the user's input)."""
    if target.contrib_ops:
        return
    domains = modelio.custom_domains(model)
    if domains:
        raise InputModelError(f"target {target.name!r} takes standard ONNX only; the model uses {', '.join(domains)}",
                              fix="choose another --target, or export the model without custom operators")

@dataclass
class FloatModel:
    """The float model to quantize and what is known about it. ``bound``: the relative L2 error
    the optimized model may show against the original's outputs, None once it was checked."""

    model: ir.Model
    feeds: list[dict]
    outputs: list[dict]  # the original model's, on ``feeds``
    notes: list[str]
    bound: float | None
    fp32_time: TimingResult | None


class OptimizedModelChanged(Exception):
    """The optimized model is not within its passes' bound of the original. ``feeds``: the
    calibration feeds read before it was found (a reader is read once), None if none were."""

    def __init__(self, message: str, feeds: list[dict] | None = None, failing: dict | None = None) -> None:
        super().__init__(message)
        self.feeds, self.failing = feeds, failing  # failing: a calibration feed it did not run on

def prepare(model_or_path: ir.Model | str | os.PathLike, target: str, verify_options: VerifyOptions | None,
            guard_runs: int | str | None, clock: PhaseClock, *, optimize: bool = True,
            reader: CalibrationReader | None = None,
            skip_passes: frozenset[str] = frozenset()) -> tuple[FloatModel, ir.Model | None]:
    """The stages every recipe shares before its own: load, reference, speed guard (FP32), optimize.

    The original model runs in a session as it will be run (graph optimizations on, weights
    pre-packed: :data:`CHECK_RUNTIME`) on the verification feeds (``verify_options``), giving the
    reference outputs (a failure there is the input's: exit 2); ``guard_runs`` times it in that
    session. Then the target's passes optimize it, unverified here: the model passes the checker
    and ``bound`` says what its outputs may differ by, for the recipe to check where it runs the
    model anyway (:func:`check_optimized`). Returns the float model and a snapshot of the original
    (weights shared) to verify pass by pass should that check fail (:func:`reverify_passes`)."""
    clock = clock or PhaseClock()
    target_spec = targets.get(target)  # an unknown target fails before anything is loaded
    model = model_or_path if isinstance(model_or_path, ir.Model) else modelio.load(model_or_path)
    require_domains(model, target_spec)
    clock.lap("load")
    verify_options = verify_options or VerifyOptions(each_pass=False)
    try:
        # In-memory weights (a caller's model) are pre-packed only if small: packing copies them.
        prepack = modelio.in_memory_weight_bytes(model) <= modelio.AUTO_EXTERNAL_BYTES
        with session(model, target, prepack=prepack) as runtime:
            verify_feeds, float_outputs, seconds = reference(runtime, model, verify_options)
            clock.lap("reference")
            fp32_time = time_feeds("fp32", runtime, verify_feeds, seconds, guard_runs)
            if fp32_time is not None:
                clock.lap("speed_guard")
    except BackendFailedError as exc:
        raise InputModelError(
            f"ONNX Runtime cannot load the original model: {exc.what}", where=target,
            fix="qcompile checks every model on ONNX Runtime; check that this one loads there") from None
    if reader is not None:
        fit_reader(reader, verify_feeds)
    float_model = FloatModel(model, verify_feeds, float_outputs, [], None, fp32_time)
    original = snapshot(model) if optimize else None  # shares the weights: cheap
    if optimize:
        # checked end to end below; a pass that crashes is rolled back
        pipeline = tuple(p for p in quantization_pipeline(target_spec.passes) if p not in skip_passes)
        result = optimize_with_stats(model, verify=False, pipeline=pipeline)
        float_model.model, float_model.notes = result.model, result.warnings()
        if result.modified:
            check_output(float_model.model, "all passes")
            float_model.bound = sum(verify_options.bound(make_pass(name)) for name in
                                    dict.fromkeys(s.name for s in result.stats if s.modified))
        modelio.drop_resident_weights(float_model.model)
        modelio.drop_resident_weights(original)  # weights the passes read and then removed (duplicates)
    clock.lap("optimize")
    return float_model, original


def reverify_passes(original: ir.Model, float_model: FloatModel, verify_options: VerifyOptions,
                    target: str, also: dict | None = None) -> FloatModel:
    """The optimized model failed its check: find the pass as `qcompile optimize` would (each pass
    verified, a failing one rolled back) and return the float model that passes. Rare: a qcompile bug.
    ``also``: a feed it failed to run on, verified on too (the original failing on it: exit 2)."""
    feeds = float_model.feeds + ([also] if also is not None else [])
    model, _, _, notes = prepare_float_model(original, True, replace(verify_options, feeds=feeds),
                                             pipeline=quantization_pipeline(targets.get(target).passes))
    return FloatModel(model, float_model.feeds, float_model.outputs, notes, None, float_model.fp32_time)

@contextlib.contextmanager
def session(model: ir.Model, target: str, *, prepack: bool = True) -> Iterator[Runtime]:
    """A runtime on ``model`` — the target's check runtime (ORT CPU), run as it will be run
    (:data:`CHECK_RUNTIME`); its memory-mapped weights stay non-resident while the runtime pre-packs
    them (one float copy at a time). A quantized model is always pre-packed: its weights are a
    quarter of the float ones. FP16/BF16 parts, which ORT CPU lacks kernels for, run emulated
    (qcompile.precision: rounded where the model stores them, computed in FP32)."""
    from qcompile.precision import has_low_precision

    options = CHECK_RUNTIME if prepack else replace(CHECK_RUNTIME, extra={"session.disable_prepacking": "1"})
    if has_low_precision(model):
        from qcompile.passes.quant.emulate import emulate_low_precision

        model = emulate_low_precision(model)
    with contextlib.ExitStack() as stack:
        with memory.shedding(model):
            runtime = stack.enter_context(execute.loaded(model, targets.get(target).check_runtime, options))
        yield runtime


def reference(runtime: Runtime, model: ir.Model, options: VerifyOptions) -> tuple[list[dict], list[dict], list[float]]:
    """The verification feeds (given, or sized so that the original runs), the original model's
    outputs on them and the seconds of each run; a failure here is the input's."""
    feeds, how = choose_feeds(model, options, runtime)
    try:
        return feeds, *run_all(runtime, feeds)
    except BackendFailedError as exc:
        raise InputModelError(f"the original model did not run on the {how}: {exc.what}",
                              fix="check the data matches the model's inputs") from None


def run_all(runtime: Runtime, feeds: list[dict]) -> tuple[list[dict], list[float]]:
    """Every feed's outputs, and the seconds each run took (as execute.run_all, timed)."""
    outputs, seconds = [], []
    try:
        for feed in feeds:
            started = time.perf_counter()
            outputs.append(runtime.run(feed))
            seconds.append(time.perf_counter() - started)
    except BackendError as exc:
        raise BackendFailedError(str(exc), where=runtime.name, fix="check the inputs match the model") from None
    return outputs, seconds


def time_feeds(label: str, runtime: Runtime, feeds: list[dict], seconds: list[float],
          runs: int | str | None) -> TimingResult | None:
    """The speed guard's timing of ``runtime`` on the verification feeds shaped like the first,
    which the check has just run (``seconds``): those runs count, but for the session's first."""
    if not runs or not feeds:
        return None
    shapes = [{name: np.shape(a) for name, a in feed.items()} for feed in feeds]
    timed = [i for i in range(len(feeds)) if shapes[i] == shapes[0]]
    first = next(iter(feeds[0].values()), None)
    items = first.shape[0] if first is not None and np.ndim(first) else 1
    return time_runs(label, lambda i: runtime.run(feeds[timed[i % len(timed)]]), runs, warmup=1,
                     items_per_run=items, done=[seconds[i] for i in timed if i > 0])


#: The lowering's stated bound. A quantized output whose shape differs from the float one is a lowering
#: bug (exit 3). Accuracy is the recipe's business, not a bug: below this SQNR, or with non-finite
#: values where the float model has none, the result is written with a note naming the output.
LOWERING_NOTE_SQNR_DB = 10.0


def check_lowering(comparison: Comparison, stage: str) -> list[str]:
    """Raise for a lowering that changed an output's shape; notes for outputs far from the float ones."""
    notes = []
    for out in comparison.outputs.values():
        if out.shape_mismatch:
            raise VerificationError(f"{stage_name(stage)} changed output {out.name!r}: {out.shape_mismatch}",
                                    stage=stage)
        if out.nonfinite_mismatch:
            notes.append(f"output {out.name!r}: {out.nonfinite_mismatch} non-finite values where the float model "
                         "has finite ones (exclude the node that computes it: --exclude)")
        elif out.sqnr_db < LOWERING_NOTE_SQNR_DB:
            notes.append(f"output {out.name!r} is {out.sqnr_db:.1f} dB SQNR from the float model's "
                         f"(< {LOWERING_NOTE_SQNR_DB:g} dB): check the accuracy, "
                         "or keep sensitive nodes float (--exclude)")
    return notes


def stage_name(name: str) -> str:
    return name if " " in name else f"pass {name!r}"


def check_output(model: ir.Model, stage: str, target: str = "ort-cpu") -> None:
    """The ONNX checker on a model qcompile produced (in the target's strictest terms): a failure is
    qcompile's bug."""
    spec = targets.get(target)
    try:
        modelio.check(model, full=spec.strict_check, standard_only=not spec.contrib_ops)
    except QCompileError as exc:
        raise VerificationError(f"{stage_name(stage)} produced an invalid model: {exc.what}", stage=stage) from None


def run_checked(runtime: Runtime, feeds: list[dict], stage: str) -> tuple[list[dict], list[float]]:
    try:
        return run_all(runtime, feeds)
    except BackendFailedError as exc:
        raise VerificationError(f"{stage_name(stage)} produced a model the runtime cannot run: {exc.what}",
                                stage=stage) from None


def outputs_of(model: ir.Model, feeds: list[dict], stage: str, target: str) -> list[dict]:
    """The outputs of a model qcompile produced, after the checker (see :func:`check_result`)."""
    check_output(model, stage, target)
    try:
        with session(model, target) as runtime:
            return run_checked(runtime, feeds, stage)[0]
    except BackendFailedError as exc:
        raise VerificationError(f"{stage_name(stage)} produced a model the runtime cannot load: {exc.what}",
                                stage=stage) from None


def check_optimized(float_model: FloatModel, outputs: list[dict]) -> None:
    """The optimized model's outputs against the original's, within the passes' bound."""
    comparison = compare_outputs(zip(float_model.outputs, outputs))
    if not comparison.within(float_model.bound):
        worst = comparison.worst()
        detail = worst.shape_mismatch or f"rel L2 {worst.rel_l2:.3g} > {float_model.bound:g}"
        raise OptimizedModelChanged(f"output {worst.name!r} {detail}")
    float_model.bound = None


def check_optimized_model(float_model: FloatModel, target: str) -> None:
    """Run the optimized model (its own session) and hold it to its passes' bound of the original."""
    check_optimized(float_model, outputs_of(float_model.model, float_model.feeds, "all passes", target))


def check_result(model: ir.Model, float_model: FloatModel, stage: str, target: str, guard_runs: int | str | None,
                  clock: PhaseClock) -> tuple[Comparison, dict | None]:
    """The result passes the checker, runs, and is compared with the original's outputs; then the
    speed guard times it in the same session. Where the optimized model is still unchecked (nothing
    was calibrated), that comparison checks it."""
    check_output(model, stage, target)
    try:
        with session(model, target) as runtime:
            outputs, seconds = run_checked(runtime, float_model.feeds, stage)
            if float_model.bound is not None:
                check_optimized(float_model, outputs)
            clock.lap("check")
            timing = time_feeds("quantized", runtime, float_model.feeds, seconds, guard_runs)
    except BackendFailedError as exc:
        raise VerificationError(f"{stage_name(stage)} produced a model the runtime cannot load: {exc.what}",
                                stage=stage) from None
    memory.trim()  # the session's buffers, before the model is saved
    latency = None
    if timing is not None and float_model.fp32_time is not None:
        latency = guard_report(float_model.fp32_time, timing, float_model.feeds[0], target)
        clock.lap("speed_guard")
    return compare_outputs(zip(float_model.outputs, outputs)), latency
