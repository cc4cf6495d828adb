"""Static INT8 post-training quantization: optimize -> plan -> calibrate -> lower -> clean up.

    plan       the target's annotators decide what runs in INT8 (qcompile.targets, passes/quant/annotate.py)
    calibrate  one streaming pass over the reader's feeds observes only the planned tensors
    lower      INT8 per-channel weights, INT32 biases, Q/DQ on activations (passes/qdq.py)

The result is standard QDQ ONNX that the target runtime fuses into integer kernels.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Literal, Mapping

import numpy as np
import onnx_ir as ir

from qcompile import execute, memory, modelio, specs, targets
from qcompile.bench import guard_report, time_runs
from qcompile.cache import cache_root
from qcompile.calibrate import CalibrationResult, collect_ranges, tapped
from qcompile.calibration import CalibrationReader, IterableReader, describe, fit_reader, iter_feeds
from qcompile.errors import BackendFailedError, InputModelError, QCompileError, VerificationError
from qcompile.memory import PhaseClock
from qcompile.metrics import Comparison, compare_outputs
from qcompile.opsets import QDQ_PER_CHANNEL, QDQ_PER_TENSOR, OpsetChange, ensure_opset, opset_of
from qcompile.passes import make_pass
from qcompile.passes.quant.annotate import QuantPlan, QuantPolicy, WeightDType, activation_spec, annotate
from qcompile.passes.quant.qdq import QDQLoweringPass
from qcompile.passmanager import PassManager, VerifyOptions, choose_feeds, snapshot
from qcompile.pipeline import optimize_with_stats, prepare_float_model
from qcompile.quant.observers import Method
from qcompile.quant.qparams import QParams, activation_qparams, quantize_bias, union_ranges, weight_codes
from qcompile.recipes import DEFAULT_MIN_SQNR_DB
from qcompile.runtimes import BackendError, Runtime, RuntimeOptions, TimingResult
from qcompile.sensitivity import SensitivitySampler
from qcompile.smoothing import smooth

log = logging.getLogger(__name__)

#: Calibration feeds whose rows are kept to measure that SQNR, in at most 1/32 of the model's weight
#: bytes (but at least this much: a small model keeps every row) and qcompile.quant.algorithms.sensitivity's cap.
SENSITIVITY_FEEDS = 4
SENSITIVITY_MIN_ROW_BYTES = 32 * 1024 * 1024
#: The sessions that check the float and the quantized model run them as they will be run (graph
#: optimizations on, weights pre-packed), so that the speed guard can time them in place.
CHECK_RUNTIME = RuntimeOptions()
#: Calibration feeds kept (up to this many bytes) in case the optimized model fails its check,
#: which happens in the calibration session: they are calibrated on again after the fix.
KEEP_FEED_BYTES = 64 * 1024 * 1024


def target_policy(target: str, *, per_channel: bool = True, keep_float: Iterable[str] | None = None,
                  weight_dtype: WeightDType | None = None) -> tuple[QuantPolicy, dict]:
    """The policy of registered ``target`` on this machine, and the measurements behind it
    (qcompile.targets: ``keep_float`` and ``weight_dtype`` default to what the target measures)."""
    return targets.get(target).policy(per_channel=per_channel, keep_float=keep_float, weight_dtype=weight_dtype,
                                      cache_dir=cache_root())


def require_domains(model: ir.Model, target: targets.Target) -> None:
    """A target that takes only standard ONNX refuses a model with other domains (the user's input)."""
    if target.contrib_ops:
        return
    domains = sorted({n.domain for n in ir.traversal.RecursiveGraphIterator(model.graph)} - {"", "ai.onnx"})
    if domains:
        raise InputModelError(f"target {target.name!r} takes standard ONNX only; the model uses {', '.join(domains)}",
                              fix="choose another --target, or export the model without custom operators")


@dataclass
class QuantizeResult:
    """The quantized model and what happened on the way."""

    model: ir.Model
    plan: QuantPlan
    calibration: CalibrationResult
    policy: QuantPolicy
    kernel_ratios: dict = field(default_factory=dict)
    method: str = "mse"
    sqnr_db: dict = field(default_factory=dict)
    phase_seconds: dict = field(default_factory=dict)
    phase_peak_rss_mb: dict = field(default_factory=dict)
    smoothquant: dict | None = None
    opset: OpsetChange | None = None
    accuracy: Comparison | None = None  # the quantized model vs the float one, on the verification feeds
    notes: list[str] = field(default_factory=list)  # fallbacks and warnings, in words
    verification_feeds: list = field(default_factory=list, repr=False)
    latency: dict | None = None  # the speed guard (``guard_runs``): qcompile.bench.guard_report

    @property
    def timing_feed(self) -> dict | None:
        """A feed the float model is known to run on (the first verification feed)."""
        return self.verification_feeds[0] if self.verification_feeds else None

    def to_json(self) -> dict:
        return {
            "target": self.policy.name,
            "method": self.method,
            "activation_dtype": self.policy.activation_dtype,
            "weight_dtype": self.policy.weight_dtype,
            "per_channel": self.policy.per_channel,
            "kept_float_op_classes": sorted(self.policy.keep_float),
            "kernel_int8_speed_ratios": self.kernel_ratios,
            "plan": self.plan.to_json(),
            "calibration": self.calibration.to_json(),
            "smoothquant": self.smoothquant,
            "phase_seconds": {k: round(v, 3) for k, v in self.phase_seconds.items()},
            "phase_peak_rss_mb": {k: round(v) for k, v in self.phase_peak_rss_mb.items()},
            "node_sqnr_db": {k: round(v, 2) for k, v in sorted(self.sqnr_db.items(), key=lambda kv: kv[1])},
            "opset": self.opset.to_json() if self.opset else None,
            "accuracy_vs_float": self.accuracy.to_json() if self.accuracy else None,
            "latency": self.latency,
            "notes": list(self.notes),
        }


def shared_qparams(model: ir.Model, plan: QuantPlan, ranges: Mapping[str, tuple[float, float]]) -> dict[str, QParams]:
    """Activation parameters from each value's own spec (dtype, symmetry: annotate.py); values that
    share a scale get the union of their ranges."""
    union = union_ranges(plan.shared, ranges)
    params = {}
    for name in ranges:
        spec = activation_spec(model, name)
        params[name] = activation_qparams(*union[name], dtype=spec.dtype, symmetric=spec.symmetric)
    return params


def quantize(
    model_or_path: ir.Model | str | os.PathLike,
    reader: CalibrationReader,
    *,
    target: str = "ort-cpu",
    method: Method = "mse",
    per_channel: bool = True,
    exclude: Iterable[str] = (),
    samples: int | None = None,
    keep_float: Iterable[str] | None = None,
    optimize: bool = True,
    verify_options: VerifyOptions | None = None,
    min_sqnr_db: float | None = DEFAULT_MIN_SQNR_DB,
    smoothquant: float | str | None = None,
    weight_dtype: WeightDType | None = None,
    quantize_attention: bool = False,
    guard_runs: int | Literal["auto"] | None = None,
    clock: PhaseClock | None = None,
) -> QuantizeResult:
    """Quantize a float model to static INT8 QDQ for ``target`` with ranges from ``reader``.

    Works in place when given an ir.Model (like :func:`qcompile.optimize`).

    ``keep_float`` names op classes to leave in float, ``weight_dtype`` the INT8 weight storage
    (int8, or uint8 with zero point 128; both default to what is measured on this CPU);
    ``exclude`` names nodes, op types or name patterns to leave in float; MatMul/Gemm nodes whose
    INT8 output SQNR on the first calibration feeds is below ``min_sqnr_db`` stay float too
    (None: keep every planned node in INT8). ``smoothquant`` (an alpha, or "auto") first folds
    SmoothQuant scales into the FP32 model, from the same calibration feeds. ``quantize_attention``
    puts activation x activation MatMuls (attention Q·Kᵀ and scores·V) in INT8 too, both inputs with
    per-tensor activation scales; they stay float by default.

    Checks, each on the verification feeds (``verify_options``): the original model runs and gives
    the reference outputs; the optimized model passes the checker and stays within its passes'
    bounds of them (computed in the calibration session, which also runs those feeds); the
    quantized model passes the checker, runs, and is compared with them (``accuracy``). Every
    session runs the model as it will be run (graph optimizations on, pre-packed weights), and
    ``guard_runs`` (a number or "auto", see :func:`qcompile.bench.time_runs`) times the original
    and the quantized model in those sessions on the verification feeds shaped like the first, the
    check's own runs included (``latency``): one float copy of the weights is resident at a time,
    so the two are timed in turn, not interleaved.
    """
    clock = clock or PhaseClock()
    target_spec = targets.get(target)  # an unknown target fails before anything is loaded
    model = model_or_path if isinstance(model_or_path, ir.Model) else modelio.load(model_or_path)
    require_domains(model, target_spec)
    clock.lap("load")
    verify_options = verify_options or VerifyOptions(each_pass=False)
    try:
        # In-memory weights (a caller's model) are pre-packed only if small: packing copies them.
        prepack = modelio.in_memory_weight_bytes(model) <= modelio.AUTO_EXTERNAL_BYTES
        with _session(model, target, prepack=prepack) as runtime:
            verify_feeds, float_outputs, seconds = _reference(runtime, model, verify_options)
            clock.lap("reference")
            fp32_time = _time("fp32", runtime, verify_feeds, seconds, guard_runs)
            if fp32_time is not None:
                clock.lap("speed_guard")
    except BackendFailedError as exc:
        raise InputModelError(
            f"ONNX Runtime cannot load the original model: {exc.what}", where=target,
            fix="qcompile checks every model on ONNX Runtime; check that this one loads there") from None
    fit_reader(reader, verify_feeds)
    float_model = _FloatModel(model, verify_feeds, float_outputs, [], None, fp32_time)
    if optimize:
        original = snapshot(model)  # shares the weights: cheap
        # checked end to end below; a pass that crashes is rolled back
        result = optimize_with_stats(model, verify=False, pipeline=target_spec.passes)
        float_model.model, float_model.notes = result.model, result.warnings()
        if result.modified:
            check_output(float_model.model, "all passes")
            float_model.bound = sum(verify_options.bound(make_pass(name)) for name in
                                    dict.fromkeys(s.name for s in result.stats if s.modified))
        modelio.drop_resident_weights(float_model.model)
        modelio.drop_resident_weights(original)  # weights the passes read and then removed (duplicates)
    clock.lap("optimize")
    args = dict(target=target, method=method, per_channel=per_channel, exclude=exclude, samples=samples,
                keep_float=keep_float, min_sqnr_db=min_sqnr_db, smoothquant=smoothquant, weight_dtype=weight_dtype,
                quantize_attention=quantize_attention, guard_runs=guard_runs)
    try:
        return _quantize_float(float_model, reader, clock, **args)
    except _OptimizedModelChanged as exc:
        # The optimized model is off: find the pass as `qcompile optimize` would (each pass verified, a
        # failing one rolled back), then quantize the model that passes. Rare: it means a qcompile bug.
        log.warning("the optimized model fails its check (%s); verifying each pass", exc)
        model, _, _, notes = prepare_float_model(original, True, replace(verify_options, feeds=verify_feeds),
                                                 pipeline=target_spec.passes)
        float_model = _FloatModel(model, verify_feeds, float_outputs, notes, None, fp32_time)
        return _quantize_float(float_model, reader if exc.feeds is None else IterableReader(exc.feeds), clock, **args)


@dataclass
class _FloatModel:
    """The float model to quantize and what is known about it. ``bound``: the relative L2 error
    the optimized model may show against the original's outputs, None once it was checked."""

    model: ir.Model
    feeds: list[dict]
    outputs: list[dict]  # the original model's, on ``feeds``
    notes: list[str]
    bound: float | None
    fp32_time: TimingResult | None


class _OptimizedModelChanged(Exception):
    """The optimized model is not within its passes' bound of the original. ``feeds``: the
    calibration feeds read before it was found (a reader is read once), None if none were."""

    def __init__(self, message: str, feeds: list[dict] | None = None) -> None:
        super().__init__(message)
        self.feeds = feeds


def _quantize_float(float_model: _FloatModel, reader: CalibrationReader, clock: PhaseClock, *, target: str,
                    method: Method, per_channel: bool, exclude: Iterable[str], samples: int | None,
                    keep_float: Iterable[str] | None, min_sqnr_db: float | None, smoothquant: float | str | None,
                    weight_dtype: WeightDType | None, quantize_attention: bool,
                    guard_runs: int | str | None) -> QuantizeResult:
    """Plan, calibrate, lower and check (see :func:`quantize`)."""
    model, verify_feeds, notes = float_model.model, float_model.feeds, float_model.notes
    target_spec = targets.get(target)
    minimum = max(QDQ_PER_CHANNEL if per_channel else QDQ_PER_TENSOR, target_spec.min_opset)
    if float_model.bound is not None and (smoothquant is not None or opset_of(model) < minimum):
        _check_optimized(float_model, _outputs(model, verify_feeds, "all passes", target))  # not the model calibrated
    model, opset = ensure_opset(model, minimum, verify_feeds,
                                "per-channel Q/DQ needs opset 13" if per_channel else "Q/DQ needs opset 10")
    if not opset.ok:
        if not per_channel or opset.before < QDQ_PER_TENSOR:
            raise InputModelError(f"cannot quantize a model at opset {opset.before}: {opset.reason}",
                                  fix="re-export the model at opset 13 or newer")
        per_channel = False
        notes.append(f"weights per tensor: the model stays at opset {opset.before} ({opset.reason})")
    if opset.action == "upgraded":
        notes.append(f"opset {opset.before} -> {opset.after} (verified): {opset.reason}")
    clock.lap("opset")
    policy, ratios = target_policy(target, per_channel=per_channel, keep_float=keep_float, weight_dtype=weight_dtype)
    policy = policy.with_(activation_by_activation_matmul=quantize_attention)
    smoothing = None
    if smoothquant is not None:
        feeds = list(iter_feeds(reader, specs.input_specs(model), samples))  # needed twice
        smoothing = smooth(model, feeds, smoothquant, method=method, activation_dtype=policy.activation_dtype,
                           symmetric=policy.activation_symmetric)
        model = smoothing.model
        reader = IterableReader(feeds)
        clock.lap("smoothquant")
    model = PassManager([make_pass("shape-inference")])(model).model  # verified exactly (structure unchanged)
    plan = annotate(model, policy, frozenset(exclude))
    clock.lap("plan")
    smoothing_json = smoothing.to_json() if smoothing else None
    if not plan.quantized_nodes:
        notes.append("nothing to quantize: no MatMul/Gemm/Conv/ConvTranspose with constant weights runs in INT8 "
                     "here; the optimized float model is the result")
        model = PassManager([make_pass("clear-shapes")])(model).model
        accuracy, latency = _check_result(model, float_model, "the quantize pipeline", target, guard_runs, clock)
        return QuantizeResult(model, plan, CalibrationResult({}), policy, ratios, method, {}, clock.seconds,
                              clock.peak_rss_mb, smoothing_json, opset, accuracy, notes, verify_feeds, latency)
    sampler = None
    if min_sqnr_db is not None:  # the rows kept for it are resident with the calibration session's weights
        observed, quantized = set(plan.activations), set(plan.quantized_nodes)
        nodes = [n for n in model.graph if n.name in quantized and n.inputs[0].name in observed]
        sampler = SensitivitySampler(model, nodes, {name: spec.axis for name, spec in plan.weights.items()},
                                     SENSITIVITY_FEEDS, row_bytes=max(SENSITIVITY_MIN_ROW_BYTES,
                                                                      modelio.initializer_bytes(model) // 32))
    memory.trim()
    check_feeds = verify_feeds if float_model.bound is not None else []
    kept: list[dict] = []  # the feeds read, should the optimized model fail its check
    if check_feeds:
        reader = recording = _Recording(reader, iter_feeds(reader, specs.input_specs(model), samples), kept)
    outputs = [v.name for v in model.graph.outputs]
    with tapped(model, plan.activations, keep_outputs=bool(check_feeds)) as runtime:
        calibration = collect_ranges(model, plan.activations, reader, method=method, samples=samples,
                                     symmetric=policy.activation_symmetric, runtime=runtime,
                                     extra=sampler.statistics() if sampler is not None else None,
                                     check_feeds=check_feeds, check_outputs=outputs)
    modelio.drop_resident_weights(model)  # the session is gone: weights are next read one at a time
    if check_feeds:
        try:
            _check_optimized(float_model, calibration.check_outputs)
        except _OptimizedModelChanged as exc:
            if not recording.complete:  # too much data to keep: the reader cannot be read again
                raise VerificationError(f"the optimize passes changed the model's semantics: {exc}", stage="all passes",
                                        fix="run `qcompile optimize` on the model to find the pass") from None
            raise _OptimizedModelChanged(str(exc), kept) from None
    clock.lap("calibrate")
    qparams = shared_qparams(model, plan, calibration.ranges)
    sqnr: dict[str, float] = sampler.sqnr(qparams) if sampler is not None else {}
    if sampler is not None:
        clock.lap("sensitivity")
    fragile = {name: db for name, db in sqnr.items() if db < min_sqnr_db}
    if fragile:
        reasons = {name: f"INT8 output SQNR {db:.1f} dB < {min_sqnr_db:g} dB on calibration data"
                   for name, db in fragile.items()}
        plan = annotate(model, policy, frozenset(exclude), float_reasons=reasons)
        ranges = {k: v for k, v in calibration.ranges.items() if k in set(plan.activations)}
        qparams = shared_qparams(model, plan, ranges)
    codes = sampler.codes if sampler is not None else None
    sampler = None
    lowering = [QDQLoweringPass(qparams, weight_codes(codes), quantize_bias), make_pass("dead-code"),
                make_pass("topo-sort"), make_pass("clear-shapes")]
    model = PassManager(lowering)(model).model
    memory.trim()
    clock.lap("lower")
    accuracy, latency = _check_result(model, float_model, "qdq-lowering", target, guard_runs, clock)
    notes += check_lowering(accuracy, "qdq-lowering")
    return QuantizeResult(model, plan, calibration, policy, ratios, method, sqnr, clock.seconds, clock.peak_rss_mb,
                          smoothing_json, opset, accuracy, notes, verify_feeds, latency)


class _Recording(IterableReader):
    """The feeds of ``reader``, each also kept in ``kept`` while they add up to at most
    :data:`KEEP_FEED_BYTES` (beyond it ``kept`` is emptied and ``complete`` turns False)."""

    def __init__(self, reader: CalibrationReader, feeds: Iterable[dict], kept: list[dict]) -> None:
        super().__init__(feeds, describe(reader), user_code=getattr(reader, "user_code", True))
        self.kept, self.complete, self._bytes = kept, True, 0

    def get_next(self) -> dict | None:
        feed = super().get_next()
        if feed is not None and self.complete:
            self._bytes += sum(np.asarray(a).nbytes for a in feed.values())
            self.complete = self._bytes <= KEEP_FEED_BYTES
            if self.complete:
                self.kept.append(feed)
            else:
                self.kept.clear()
        return feed


@contextlib.contextmanager
def _session(model: ir.Model, target: str, *, prepack: bool = True) -> Iterator[Runtime]:
    """A runtime on ``model``, run as it will be run (:data:`CHECK_RUNTIME`); its memory-mapped
    weights stay non-resident while the runtime pre-packs them (one float copy at a time). A
    quantized model is always pre-packed: its weights are a quarter of the float ones."""
    options = CHECK_RUNTIME if prepack else replace(CHECK_RUNTIME, extra={"session.disable_prepacking": "1"})
    with contextlib.ExitStack() as stack:
        with memory.shedding(model):
            runtime = stack.enter_context(execute.loaded(model, targets.get(target).runtime, options))
        yield runtime


def _reference(runtime: Runtime, model: ir.Model, options: VerifyOptions) -> tuple[list[dict], list[dict], list[float]]:
    """The verification feeds (given, or sized so that the original runs), the original model's
    outputs on them and the seconds of each run; a failure here is the input's."""
    feeds, how = choose_feeds(model, options, runtime)
    try:
        return feeds, *_run_all(runtime, feeds)
    except BackendFailedError as exc:
        raise InputModelError(f"the original model did not run on the {how}: {exc.what}",
                              fix="check the data matches the model's inputs") from None


def _run_all(runtime: Runtime, feeds: list[dict]) -> tuple[list[dict], list[float]]:
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


def _time(label: str, runtime: Runtime, feeds: list[dict], seconds: list[float],
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
            raise VerificationError(f"{_stage(stage)} changed output {out.name!r}: {out.shape_mismatch}", stage=stage)
        if out.nonfinite_mismatch:
            notes.append(f"output {out.name!r}: {out.nonfinite_mismatch} non-finite values where the float model "
                         "has finite ones (exclude the node that computes it: --exclude)")
        elif out.sqnr_db < LOWERING_NOTE_SQNR_DB:
            notes.append(f"output {out.name!r} is {out.sqnr_db:.1f} dB SQNR from the float model's "
                         f"(< {LOWERING_NOTE_SQNR_DB:g} dB): check the accuracy, "
                         "or keep sensitive nodes float (--exclude)")
    return notes


def time_in_turn(original: ir.Model, quantized: ir.Model, feeds: list[dict], target: str,
                 runs: int | str | None, clock: PhaseClock) -> dict | None:
    """The speed guard for a result whose original was not timed in a check session (weight-only):
    each model timed in its own session, in turn (one float copy of the weights resident at a time)."""
    if not runs or not feeds:
        return None
    timings = []
    for label, model in (("fp32", original), ("quantized", quantized)):
        prepack = label == "quantized" or modelio.in_memory_weight_bytes(model) <= modelio.AUTO_EXTERNAL_BYTES
        with _session(model, target, prepack=prepack) as runtime:
            _, seconds = _run(runtime, feeds, "the speed guard")
            timings.append(_time(label, runtime, feeds, seconds, runs))
        memory.trim()
    clock.lap("speed_guard")
    return guard_report(timings[0], timings[1], feeds[0], target)


def _stage(name: str) -> str:
    return name if " " in name else f"pass {name!r}"


def check_output(model: ir.Model, stage: str, target: str = "ort-cpu") -> None:
    """The ONNX checker on a model qcompile produced (in the target's strictest terms): a failure is
    qcompile's bug."""
    spec = targets.get(target)
    try:
        modelio.check(model, full=spec.strict_check, standard_only=not spec.contrib_ops)
    except QCompileError as exc:
        raise VerificationError(f"{_stage(stage)} produced an invalid model: {exc.what}", stage=stage) from None


def _run(runtime: Runtime, feeds: list[dict], stage: str) -> tuple[list[dict], list[float]]:
    try:
        return _run_all(runtime, feeds)
    except BackendFailedError as exc:
        raise VerificationError(f"{_stage(stage)} produced a model the runtime cannot run: {exc.what}",
                                stage=stage) from None


def _outputs(model: ir.Model, feeds: list[dict], stage: str, target: str) -> list[dict]:
    """The outputs of a model qcompile produced, after the checker (see :func:`_check_result`)."""
    check_output(model, stage, target)
    try:
        with _session(model, target) as runtime:
            return _run(runtime, feeds, stage)[0]
    except BackendFailedError as exc:
        raise VerificationError(f"{_stage(stage)} produced a model the runtime cannot load: {exc.what}",
                                stage=stage) from None


def _check_optimized(float_model: _FloatModel, outputs: list[dict]) -> None:
    """The optimized model's outputs against the original's, within the passes' bound."""
    comparison = compare_outputs(zip(float_model.outputs, outputs))
    if not comparison.within(float_model.bound):
        worst = comparison.worst()
        detail = worst.shape_mismatch or f"rel L2 {worst.rel_l2:.3g} > {float_model.bound:g}"
        raise _OptimizedModelChanged(f"output {worst.name!r} {detail}")
    float_model.bound = None


def _check_result(model: ir.Model, float_model: _FloatModel, stage: str, target: str, guard_runs: int | str | None,
                  clock: PhaseClock) -> tuple[Comparison, dict | None]:
    """The result passes the checker, runs, and is compared with the original's outputs; then the
    speed guard times it in the same session. Where the optimized model is still unchecked (nothing
    was calibrated), that comparison checks it."""
    check_output(model, stage, target)
    try:
        with _session(model, target) as runtime:
            outputs, seconds = _run(runtime, float_model.feeds, stage)
            if float_model.bound is not None:
                _check_optimized(float_model, outputs)
            clock.lap("check")
            timing = _time("quantized", runtime, float_model.feeds, seconds, guard_runs)
    except BackendFailedError as exc:
        raise VerificationError(f"{_stage(stage)} produced a model the runtime cannot load: {exc.what}",
                                stage=stage) from None
    memory.trim()  # the session's buffers, before the model is saved
    latency = None
    if timing is not None and float_model.fp32_time is not None:
        latency = guard_report(float_model.fp32_time, timing, float_model.feeds[0], target)
        clock.lap("speed_guard")
    return compare_outputs(zip(float_model.outputs, outputs)), latency
