"""Static INT8 post-training quantization: optimize -> plan -> calibrate -> lower -> clean up.

    plan       the target's annotators decide what runs in INT8 (qcompile.targets, passes/quant/annotate.py)
    calibrate  one streaming pass over the reader's feeds observes only the planned tensors
    lower      INT8 per-channel weights, INT32 biases, Q/DQ on activations (passes/qdq.py)

The result is standard QDQ ONNX that the target runtime fuses into integer kernels.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Mapping

import numpy as np
import onnx_ir as ir

from qcompile import memory, modelio, records, specs, targets
from qcompile.budget import BudgetResult, BudgetSpec, instead
from qcompile.cache import cache_root
from qcompile.calibrate import CalibrationResult, StatisticsCache, collect_ranges, graph_fingerprint, tapped
from qcompile.calibration import CalibrationReader, IterableReader, describe, iter_feeds
from qcompile.errors import InputModelError, InputSpecError, VerificationError
from qcompile.memory import PhaseClock
from qcompile.metrics import Comparison
from qcompile.opsets import QDQ_FP8, QDQ_PER_CHANNEL, QDQ_PER_TENSOR, OpsetChange, ensure_opset, opset_of
from qcompile.passes import make_pass
from qcompile.passes.quant.annotate import QuantPlan, QuantPolicy, WeightDType, activation_specs, annotate
from qcompile.passes.quant.qdq import QDQLoweringPass
from qcompile.passmanager import PassManager, VerifyOptions
from qcompile.precision import PrecisionReport, lower_precision
from qcompile.quant.observers import Method
from qcompile.quant.qparams import QParams, activation_qparams, quantize_bias, union_ranges, weight_codes
from qcompile.recipes import DEFAULT_MIN_SQNR_DB
from qcompile.runtimes import BackendError
from qcompile.sensitivity import SensitivitySampler
from qcompile.smoothing import smooth
from qcompile.stages import (
    FloatModel,
    OptimizedModelChanged,
    check_lowering,
    check_optimized,
    check_optimized_model,
    check_result,
    prepare,
    reverify_passes,
)
from qcompile.targets import FLOAT_TYPES

log = logging.getLogger(__name__)

#: Ops of a model quantized before (ONNX's integer ops, ORT's quantized contrib ops): with no float
#: weighted op left, "nothing to quantize" says the model is quantized already.
INTEGER_OPS = frozenset({"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "DynamicQuantizeLinear",
                         "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits", "QAttention", "QGemm"})
#: Calibration feeds whose rows are kept to measure that SQNR, in at most 1/32 of the model's weight
#: bytes (but at least this much: a small model keeps every row) and qcompile.quant.algorithms.sensitivity's cap.
SENSITIVITY_FEEDS = 4
SENSITIVITY_MIN_ROW_BYTES = 32 * 1024 * 1024
#: Calibration feeds kept (up to this many bytes) in case the optimized model fails its check,
#: which happens in the calibration session: they are calibrated on again after the fix.
KEEP_FEED_BYTES = 64 * 1024 * 1024


def target_policy(target: str, *, per_channel: bool = True, keep_float: Iterable[str] | None = None,
                  weight_dtype: WeightDType | None = None, precision: str = "int8") -> tuple[QuantPolicy, dict]:
    """The policy of registered ``target`` on this machine for ``precision`` (int8 | fp8), and the
    measurements behind it (qcompile.targets: ``keep_float`` and ``weight_dtype`` default to what the
    target measures)."""
    return targets.get(target).policy(per_channel=per_channel, keep_float=keep_float, weight_dtype=weight_dtype,
                                      cache_dir=cache_root(), precision=precision)


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
    high_precision: PrecisionReport | None = None  # the unquantized part in FP16/BF16 (GPU targets)
    budget: BudgetResult | None = None  # the accuracy-budget search, when one ran (qcompile/budget.py)

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
            "high_precision": self.high_precision.to_json() if self.high_precision else None,
            "accuracy_budget": self.budget.to_json() if self.budget else None,
            "notes": list(self.notes),
        }


def shared_qparams(model: ir.Model, plan: QuantPlan, ranges: Mapping[str, tuple[float, float]],
                   scale_dtype: str | None = None) -> dict[str, QParams]:
    """Activation parameters from each value's own spec (dtype, symmetry: annotate.py); values that
    share a scale get the union of their ranges; ``scale_dtype``: scales stored in that float type."""
    union = union_ranges(plan.shared, ranges)
    specs = activation_specs(model)
    return {name: activation_qparams(*union[name], dtype=specs[name].dtype, symmetric=specs[name].symmetric,
                                     scale_dtype=scale_dtype) for name in ranges}


def quantize_static(
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
    precision: str = "int8",
    high_precision: str = "fp32",
    statistics: StatisticsCache | None = None,
    budget: BudgetSpec | None = None,
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
    per-tensor activation scales; they stay float by default. ``precision`` int8 or fp8 (E4M3, opset
    19) is the quantized element type; ``high_precision`` (fp32 | fp16 | bf16) what the rest runs in
    (qcompile.precision). ``statistics``: calibration statistics shared with other runs on the same
    graph and data (computed on the first, reused by the next: qcompile.calibrate.StatisticsCache).
    ``budget`` replaces the per-node SQNR guard by an accuracy budget on held-out data
    (qcompile/budget.py): everything quantizable is planned, then layers fall back until the end
    metric holds; ``budget`` on the result says how (``met`` False: the closest candidate is the result).

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
    targets.get(target)  # an unknown target fails before anything is loaded
    verify_options = verify_options or VerifyOptions(each_pass=False)
    # the attention MatMuls asked for in INT8 must survive: no fused attention kernel replaces them
    skip = frozenset({"fuse-attention"}) if quantize_attention else frozenset()
    float_model, original = prepare(model_or_path, target, verify_options, guard_runs, clock, optimize=optimize,
                                    reader=reader, skip_passes=skip)
    args = dict(target=target, method=method, per_channel=per_channel, exclude=exclude, samples=samples,
                keep_float=keep_float, min_sqnr_db=min_sqnr_db, smoothquant=smoothquant, weight_dtype=weight_dtype,
                quantize_attention=quantize_attention, guard_runs=guard_runs, precision=precision,
                high_precision=high_precision, statistics=statistics, budget=budget)
    try:
        return _quantize_float(float_model, reader, clock, **args)
    except OptimizedModelChanged as exc:
        # The optimized model is off: find the pass as `qcompile optimize` would (each pass verified, a
        # failing one rolled back), then quantize the model that passes. Rare: it means a qcompile bug.
        log.warning("the optimized model fails its check (%s); verifying each pass", exc)
        float_model = reverify_passes(original, float_model, verify_options, target, also=exc.failing)
        if exc.feeds is None and exc.failing is not None:
            raise VerificationError(f"the optimize passes made a model that fails on calibration data: {exc}",
                                    stage="all passes", fix="run `qcompile optimize --data` on that data to find "
                                                            "the pass") from None
        return _quantize_float(float_model, reader if exc.feeds is None else IterableReader(exc.feeds), clock, **args)


def _quantize_float(float_model: FloatModel, reader: CalibrationReader, clock: PhaseClock, *, target: str,
                    method: Method, per_channel: bool, exclude: Iterable[str], samples: int | None,
                    keep_float: Iterable[str] | None, min_sqnr_db: float | None, smoothquant: float | str | None,
                    weight_dtype: WeightDType | None, quantize_attention: bool,
                    guard_runs: int | str | None, precision: str, high_precision: str,
                    statistics: StatisticsCache | None, budget: BudgetSpec | None) -> QuantizeResult:
    """Plan, calibrate, lower and check (see :func:`quantize`)."""
    model, verify_feeds, notes = float_model.model, float_model.feeds, float_model.notes
    target_spec = targets.get(target)
    guard_db = min_sqnr_db  # what decides should the budget have nothing to be measured on
    if budget is not None:
        min_sqnr_db = None  # the most aggressive plan: the budget decides what falls back
        if high_precision != "fp32":  # candidates are scored natively on the check runtime (ORT CPU)
            raise InputSpecError(f"--accuracy-budget scores candidates on ORT CPU, which does not run the "
                                  f"{high_precision} part natively", where=target,
                                  fix="add --high-precision fp32 (the same Q/DQ placement), or drop the budget")
    minimum = max(QDQ_PER_CHANNEL if per_channel else QDQ_PER_TENSOR, target_spec.min_opset,
                  QDQ_FP8 if precision == "fp8" else 0)
    reason = ("FP8 Q/DQ needs opset 19" if precision == "fp8" else
              "per-channel Q/DQ needs opset 13" if per_channel else "Q/DQ needs opset 10")
    # FP16/BF16 Q/DQ scales (DQ writing FP16 straight into the FP16 MatMul) need opset 19
    preferred = max(minimum, QDQ_FP8 if high_precision != "fp32" else 0)
    if float_model.bound is not None and (smoothquant is not None or opset_of(model) < preferred):
        check_optimized_model(float_model, target)  # not the model calibrated
    model, opset = ensure_opset(model, preferred, verify_feeds,
                                reason if preferred == minimum else f"{high_precision} Q/DQ scales need opset 19")
    if not opset.ok and preferred > minimum:
        notes.append(f"Q/DQ stays FP32 between {high_precision} nodes: the model stays at opset {opset.before} "
                     f"({opset.reason})")
        model, opset = ensure_opset(model, minimum, verify_feeds, reason)
    if not opset.ok and precision == "fp8":
        raise InputModelError(f"cannot quantize to FP8 a model at opset {opset.before}: {opset.reason}",
                              fix="re-export the model at opset 19 or newer")
    if not opset.ok:
        if not per_channel or opset.before < QDQ_PER_TENSOR:
            raise InputModelError(f"cannot quantize a model at opset {opset.before}: {opset.reason}",
                                  fix="re-export the model at opset 13 or newer")
        per_channel = False
        notes.append(f"weights per tensor: the model stays at opset {opset.before} ({opset.reason})")
    if opset.action == "upgraded":
        notes.append(f"opset {opset.before} -> {opset.after} (verified): {opset.reason}")
    clock.lap("opset")
    policy, ratios = target_policy(target, per_channel=per_channel, keep_float=keep_float, weight_dtype=weight_dtype,
                                   precision=precision)
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
        integer = sorted({n.op_type for n in model.graph if n.op_type in INTEGER_OPS})
        why = (f"the model is already quantized ({', '.join(integer)})" if integer else
               f"no MatMul/Gemm/Conv/ConvTranspose with constant weights runs in {precision.upper()} here")
        notes.append(f"nothing to quantize: {why}; the optimized {'' if integer else 'float '}model is the result")
        model = PassManager([make_pass("clear-shapes")])(model).model
        model, lowered = lower_precision(model, high_precision, verify_feeds, exclude)
        accuracy, latency = check_result(model, float_model, "the quantize pipeline", target, guard_runs, clock)
        return QuantizeResult(model, plan, CalibrationResult({}), policy, ratios, method, {}, clock.seconds,
                              clock.peak_rss_mb, smoothing_json, opset, accuracy, notes, verify_feeds, latency,
                              lowered)
    sampler = None
    if min_sqnr_db is not None or budget is not None:  # its rows are resident with the calibration weights
        observed, quantized = set(plan.activations), set(plan.quantized_nodes)
        nodes = [n for n in model.graph if n.name in quantized and n.inputs[0].name in observed]
        sampler = SensitivitySampler(model, nodes, {name: spec.axis for name, spec in plan.weights.items()},
                                     SENSITIVITY_FEEDS, row_bytes=max(SENSITIVITY_MIN_ROW_BYTES,
                                                                      modelio.initializer_bytes(model) // 32))
    memory.trim()
    key = (graph_fingerprint(model), method, policy.activation_symmetric, samples, describe(reader)) \
        if statistics is not None else None
    hit = statistics.lookup(key, plan.activations, list(sampler.samples) if sampler else []) if key else None
    if hit is not None:
        ranges, rows = hit
        if sampler is not None:
            sampler.samples.update(rows)
        calibration = CalibrationResult(ranges, {}, statistics.samples(key), 0.0)
        if float_model.bound is not None:
            check_optimized_model(float_model, target)
        notes.append("calibration statistics reused: computed once for this graph and data")
        if budget is not None and not budget.feeds:  # samples held out of calibration: read as it would
            collections.deque(iter_feeds(reader, specs.input_specs(model), samples), maxlen=0)
    else:
        calibration = _calibrate(model, plan, float_model, reader, method=method, samples=samples,
                                 symmetric=policy.activation_symmetric, sampler=sampler)
        if statistics is not None:
            statistics.store(key, calibration.ranges, sampler.samples if sampler else {}, calibration.samples)
    clock.lap("calibrate")
    if budget is not None:
        budget, why_not = _measurable(budget, model)
        if budget is None:
            notes.append(why_not + instead(guard_db))
            min_sqnr_db = guard_db
    scale_dtype = FLOAT_TYPES.get(high_precision)  # Q/DQ scales stored in FP16/BF16 (opset 19)
    qparams = shared_qparams(model, plan, calibration.ranges, scale_dtype)
    sqnr: dict[str, float] = sampler.sqnr(qparams) if sampler is not None else {}
    if sampler is not None:
        clock.lap("sensitivity")
    fragile = {name: db for name, db in sqnr.items() if min_sqnr_db is not None and db < min_sqnr_db}
    if fragile:
        reasons = {name: f"{precision.upper()} output SQNR {db:.1f} dB < {min_sqnr_db:g} dB on calibration data"
                   for name, db in fragile.items()}
        plan = annotate(model, policy, frozenset(exclude), float_reasons=reasons)
        ranges = {k: v for k, v in calibration.ranges.items() if k in set(plan.activations)}
        qparams = shared_qparams(model, plan, ranges, scale_dtype)
    codes = sampler.codes if sampler is not None else None
    sampler = None
    scaled = smoothing.scaled if smoothing else frozenset()
    searched = None
    if budget is not None:
        model, plan, searched = _budget_search(model, plan, policy, exclude, calibration.ranges, scale_dtype,
                                               high_precision, verify_feeds, scaled, budget, target, sqnr, codes)
        notes.append(_budget_note(searched))
        lowered = None
        clock.lap("budget_search")
    else:
        model, lowered = lower_plan(model, plan, qparams, weight_codes(codes, scale_dtype), high_precision,
                                    verify_feeds, exclude, scaled)
        clock.lap("lower")
    stage = "qdq-lowering" if lowered is None else "qdq-lowering and mixed-precision"
    accuracy, latency = check_result(model, float_model, stage, target, guard_runs, clock)
    notes += check_lowering(accuracy, stage)
    return QuantizeResult(model, plan, calibration, policy, ratios, method, sqnr, clock.seconds, clock.peak_rss_mb,
                          smoothing_json, opset, accuracy, notes, verify_feeds, latency, lowered, searched)


def _budget_search(model: ir.Model, plan: QuantPlan, policy: QuantPolicy, exclude: Iterable[str],
                   ranges: Mapping[str, tuple[float, float]], scale_dtype: str | None, high_precision: str,
                   verify_feeds: list, scaled: frozenset[str], spec: BudgetSpec, target: str,
                   sqnr: Mapping[str, float], sampled_codes: dict | None) -> tuple[ir.Model, QuantPlan, BudgetResult]:
    """The accuracy-budget search (qcompile/budget.py) over candidates lowered from ``model``, which
    is saved first (each candidate starts from that float copy, memory-mapped). A layer's noise is
    its INT8 output SQNR on calibration rows where the sensitivity sampler measured one (MatMul/Gemm:
    ``sqnr``, the fixed guard's own measure), else its local SQNR on held-out data (analyze.py)."""
    import shutil
    import tempfile
    import weakref

    from qcompile.analyze import measure_layers
    from qcompile.budget import fallback_order, search
    from qcompile.evaluators import ReferenceRun

    workdir = Path(tempfile.mkdtemp(prefix="qcompile-budget-"))
    try:
        float_path = modelio.save(model, workdir / "float.onnx")
        memo: dict[tuple, tuple] = {}
        codes = weight_codes(sampled_codes, scale_dtype)

        def cached_codes(name, w, axis, dtype):  # one weight's codes serve every candidate
            key = (name, axis, dtype)
            if key not in memo:
                memo[key] = codes(name, w, axis, dtype)
            return memo[key]

        plans: dict[int, QuantPlan] = {}

        def build(kept: list[str]) -> Path:
            candidate = PassManager([make_pass("shape-inference")])(modelio.load(float_path)).model
            reasons = {name: "kept float by the accuracy budget" for name in kept}
            trial_plan = annotate(candidate, policy, frozenset(exclude), float_reasons=reasons or None)
            used = {k: v for k, v in ranges.items() if k in set(trial_plan.activations)}
            qparams = shared_qparams(candidate, trial_plan, used, scale_dtype)
            candidate, _ = lower_plan(candidate, trial_plan, qparams, cached_codes, high_precision, verify_feeds,
                                      exclude, scaled)
            plans[len(kept)] = trial_plan
            return modelio.save(candidate, workdir / f"candidate-{len(kept)}.onnx")

        first = build([])
        reference = ReferenceRun(spec.metric, float_path, spec.feeds, targets.get(target).check_runtime)
        def order() -> list[str]:
            layers = measure_layers(first, None, spec.feeds[:4])
            for layer in layers:
                if layer.node in sqnr:
                    layer.local_sqnr_db = sqnr[layer.node]
            return fallback_order(layers, spec.order)

        result = search(build, first, order, reference, spec, layers=len(plans[0].quantized_nodes))
        best = result.best
        chosen = modelio.load(best.path)
        for path in workdir.glob("candidate-*.onnx*"):
            if not str(path).startswith(best.path):
                path.unlink()
        weakref.finalize(chosen, shutil.rmtree, workdir, True)  # its weights may be read from there
        return chosen, plans[best.kept_float], result
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _measurable(spec: BudgetSpec, model: ir.Model) -> tuple[BudgetSpec | None, str | None]:
    """``spec`` ready to measure on ``model`` (its metric resolved, its held-out feeds validated),
    or None and why not (qcompile.budget.too_few_feeds)."""
    from qcompile.budget import default_metric, too_few_feeds
    from qcompile.evaluators import parse_metric

    why_not = too_few_feeds(spec)
    if why_not:
        return None, why_not
    input_specs = specs.input_specs(model)
    metric = spec.metric or parse_metric(default_metric({s.name for s in input_specs},
                                                        {v.name for v in model.graph.outputs}))
    feeds = list(iter_feeds(IterableReader(spec.feeds, "the held-out samples", user_code=False), input_specs))
    return dataclasses.replace(spec, metric=metric, feeds=feeds), None


def _budget_note(result: BudgetResult) -> str:
    best, spec = result.best, result.spec
    verdict = "within" if result.met else "NOT within"
    drop = "n/a" if best.drop is None else f"{best.drop:.4g}"
    return (f"accuracy budget: {spec.metric.name} drop {drop} {verdict} {spec.max_drop:g} on "
            f"{len(spec.feeds)} held-out samples ({spec.data or 'given data'}), {best.kept_float} of "
            f"{result.layers} layers kept float, after {len(result.trials)} trials"
            + (f" ({result.stopped})" if result.stopped else "")
            + ("" if result.met or spec.required else
               ": the closest candidate is written (the recipe's budget; --accuracy-budget X makes it a check)"))


def lower_plan(model: ir.Model, plan: QuantPlan, qparams: Mapping[str, QParams], codes, high_precision: str,
               verify_feeds: list, exclude: Iterable[str],
               scaled: frozenset[str]) -> tuple[ir.Model, PrecisionReport | None]:
    """Lower the annotated ``model`` (in place): Q/DQ, clean-up, the high-precision part, and the
    records of what was quantized (qcompile/records.py)."""
    qdq = QDQLoweringPass(qparams, codes, quantize_bias)
    model = PassManager([qdq, make_pass("dead-code"), make_pass("topo-sort"), make_pass("clear-shapes")])(model).model
    memory.trim()
    model, lowered = lower_precision(model, high_precision, verify_feeds, exclude)
    records.attach(model, records.build(model, set(plan.quantized_nodes), qdq.activation_dq, qdq.weight_dq,
                                        qdq.weight_sqnr_db, set(scaled)))
    return model, lowered


def _calibrate(model: ir.Model, plan: QuantPlan, float_model: FloatModel, reader: CalibrationReader, *,
               method: Method, samples: int | None, symmetric: bool,
               sampler: SensitivitySampler | None) -> CalibrationResult:
    """The one calibration loop over ``reader``: the plan's ranges, the sampler's rows, and (where the
    optimized model is still unchecked) its outputs on the verification feeds, held to its bound."""
    check_feeds = float_model.feeds if float_model.bound is not None else []
    kept: list[dict] = []  # the feeds read, should the optimized model fail its check
    if check_feeds:
        reader = recording = _Recording(reader, iter_feeds(reader, specs.input_specs(model), samples), kept)
    outputs = [v.name for v in model.graph.outputs]
    try:
        with tapped(model, plan.activations, keep_outputs=bool(check_feeds)) as runtime:
            calibration = collect_ranges(model, plan.activations, reader, method=method, samples=samples,
                                         symmetric=symmetric, runtime=runtime,
                                         extra=sampler.statistics() if sampler is not None else None,
                                         check_feeds=check_feeds, check_outputs=outputs)
    except BackendError as exc:
        if not check_feeds:
            raise
        failing = recording.last  # what ran last: a calibration sample, else the verification feeds
        while recording.get_next() is not None:  # the rest too: the retry calibrates on every sample
            pass
        # the unchecked optimized model fails: the passes are verified on that sample too (with the
        # original's outputs: should the original fail on it, the data is at fault)
        raise OptimizedModelChanged(f"the optimized model failed to run: {exc}",
                                    kept if recording.complete else None, failing=failing) from None
    modelio.drop_resident_weights(model)  # the session is gone: weights are next read one at a time
    if check_feeds:
        try:
            check_optimized(float_model, calibration.check_outputs)
        except OptimizedModelChanged as exc:
            if not recording.complete:  # too much data to keep: the reader cannot be read again
                raise VerificationError(f"the optimize passes changed the model's semantics: {exc}", stage="all passes",
                                        fix="run `qcompile optimize` on the model to find the pass") from None
            raise OptimizedModelChanged(str(exc), kept) from None
    return calibration


class _Recording(IterableReader):
    """The feeds of ``reader``, each also kept in ``kept`` while they add up to at most
    :data:`KEEP_FEED_BYTES` (beyond it ``kept`` is emptied and ``complete`` turns False)."""

    def __init__(self, reader: CalibrationReader, feeds: Iterable[dict], kept: list[dict]) -> None:
        super().__init__(feeds, describe(reader), user_code=getattr(reader, "user_code", True))
        self.kept, self.complete, self._bytes = kept, True, 0

    last: dict | None = None  # the feed read last: the one running when a run fails

    def get_next(self) -> dict | None:
        feed = super().get_next()
        self.last = feed if feed is not None else self.last
        if feed is not None and self.complete:
            self._bytes += sum(np.asarray(a).nbytes for a in feed.values())
            self.complete = self._bytes <= KEEP_FEED_BYTES
            if self.complete:
                self.kept.append(feed)
            else:
                self.kept.clear()
        return feed


