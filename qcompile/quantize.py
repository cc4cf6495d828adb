"""Static INT8 post-training quantization: optimize -> plan -> calibrate -> lower -> clean up.

    plan       the target's policy decides what runs in INT8 (passes/quant_policy.py)
    calibrate  one streaming pass over the reader's feeds observes only the planned tensors
    lower      INT8 per-channel weights, INT32 biases, Q/DQ on activations (passes/qdq.py)

The result is standard QDQ ONNX that the target runtime fuses into integer kernels.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import onnx_ir as ir

from qcompile import modelio, specs
from qcompile.calibrate import CalibrationResult, collect_ranges, tapped
from qcompile.calibration import fit_reader, CalibrationReader, IterableReader, iter_feeds
from qcompile.errors import UnknownNameError
from qcompile.memory import peak_rss_mb
from qcompile.models.base import cache_root
from qcompile.observers import Method
from qcompile.passes import make_pass
from qcompile.passes.qdq import QDQLoweringPass
from qcompile.passes.quant_math import QParams, activation_qparams
from qcompile.passes.quant_policy import QuantPlan, QuantPolicy, WeightDType, plan_quantization
from qcompile.errors import InputModelError
from qcompile.metrics import Comparison, compare_outputs
from qcompile.opsets import QDQ_PER_CHANNEL, QDQ_PER_TENSOR, OpsetChange, ensure_opset
from qcompile.passmanager import PassManager, VerifyOptions, checked_outputs
from qcompile.pipeline import prepare_float_model
from qcompile.sensitivity import SensitivitySampler
from qcompile.smoothing import smooth

log = logging.getLogger(__name__)

TARGETS = ("ort-cpu",)
#: MatMul/Gemm nodes whose INT8 output SQNR falls below this stay float (~4 % relative error).
DEFAULT_MIN_SQNR_DB = 28.0
#: Calibration feeds whose rows are kept to measure that SQNR.
SENSITIVITY_FEEDS = 4


def target_policy(target: str, *, per_channel: bool = True, keep_float: Iterable[str] | None = None,
                  weight_dtype: WeightDType | None = None) -> tuple[QuantPolicy, dict]:
    """The policy for ``target`` on this machine, and the kernel measurements behind it.

    ``keep_float`` and ``weight_dtype`` default to what the kernel probe measures here."""
    if target != "ort-cpu":
        raise UnknownNameError(f"unknown quantization target {target!r}", fix=f"choose from: {', '.join(TARGETS)}")
    ratios: dict = {}
    if keep_float is None:
        from qcompile.kernel_probe import probe, slower_classes

        ratios = probe(cache_dir=cache_root() / "probe")
        keep_float = slower_classes(ratios)
    if weight_dtype is None:
        from qcompile.kernel_probe import policy_weight_dtype

        weight_dtype = policy_weight_dtype(cache_dir=cache_root() / "probe")
    policy = QuantPolicy(name=target, per_channel=per_channel, keep_float=frozenset(keep_float), weight_dtype=weight_dtype)
    return policy, ratios


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
            "notes": list(self.notes),
        }


class _PhaseClock:
    """Wall time per phase of the pipeline, and the process's peak RSS at the end of each."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = now - self._last
        self.peak_rss_mb[phase] = peak_rss_mb()
        self._last = now


def shared_qparams(plan: QuantPlan, ranges: Mapping[str, tuple[float, float]], policy: QuantPolicy) -> dict[str, QParams]:
    """Activation parameters; tensors that must share a scale get the union of their ranges."""
    parent = {name: name for name in ranges}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for group in plan.shared:
        members = [m for m in group if m in parent]
        for other in members[1:]:
            parent[find(other)] = find(members[0])
    union: dict[str, tuple[float, float]] = {}
    for name, (lo, hi) in ranges.items():
        root = find(name)
        u = union.get(root, (lo, hi))
        union[root] = (min(u[0], lo), max(u[1], hi))
    return {
        name: activation_qparams(*union[find(name)], dtype=policy.activation_dtype, symmetric=policy.activation_symmetric)
        for name in ranges
    }


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
    """
    clock = _PhaseClock()
    model = model_or_path if isinstance(model_or_path, ir.Model) else modelio.load(model_or_path)
    clock.lap("load")
    model, verify_feeds, float_outputs, notes = prepare_float_model(model, optimize, verify_options)
    fit_reader(reader, verify_feeds)
    clock.lap("optimize")
    model, opset = ensure_opset(model, QDQ_PER_CHANNEL if per_channel else QDQ_PER_TENSOR, verify_feeds,
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
    model = make_pass("shape-inference")(model).model
    plan = plan_quantization(model, policy, frozenset(exclude))
    clock.lap("plan")
    if not plan.quantized_nodes:
        notes.append("nothing to quantize: no MatMul/Gemm/Conv/ConvTranspose with constant weights runs in INT8 "
                     "here; the optimized float model is the result")
        model = PassManager([make_pass("clear-shapes")])(model).model
        accuracy = compare_outputs(zip(float_outputs, checked_outputs(model, verify_feeds, "the quantize pipeline")))
        return QuantizeResult(model, plan, CalibrationResult({}), policy, ratios, method, {}, clock.seconds,
                              clock.peak_rss_mb, smoothing.to_json() if smoothing else None, opset, accuracy, notes, verify_feeds)
    sampler = SensitivitySampler(model, plan, SENSITIVITY_FEEDS) if min_sqnr_db is not None else None
    with tapped(model, plan.activations, target) as runtime:
        calibration = collect_ranges(model, plan.activations, reader, method=method, samples=samples,
                                     symmetric=policy.activation_symmetric,
                                     runtime=runtime, on_outputs=sampler)
    modelio.drop_resident_weights(model)  # the session is gone: weights are next read one at a time
    clock.lap("calibrate")
    qparams = shared_qparams(plan, calibration.ranges, policy)
    sqnr: dict[str, float] = sampler.sqnr(qparams) if sampler is not None else {}
    if sampler is not None:
        clock.lap("sensitivity")
    fragile = {name: db for name, db in sqnr.items() if db < min_sqnr_db}
    if fragile:
        plan = plan_quantization(model, policy, frozenset(exclude) | frozenset(fragile))
        for name, db in fragile.items():
            plan.kept_float[name] = f"INT8 output SQNR {db:.1f} dB < {min_sqnr_db:g} dB on calibration data"
        ranges = {k: v for k, v in calibration.ranges.items() if k in set(plan.activations)}
        qparams = shared_qparams(plan, ranges, policy)
    codes = sampler.codes if sampler is not None else None
    sampler = None
    lowering = [QDQLoweringPass(plan, qparams, codes), make_pass("dead-code"), make_pass("topo-sort"), make_pass("clear-shapes")]
    model = PassManager(lowering)(model).model
    accuracy = compare_outputs(zip(float_outputs, checked_outputs(model, verify_feeds, "qdq-lowering")))
    clock.lap("lower")
    return QuantizeResult(model, plan, calibration, policy, ratios, method, sqnr, clock.seconds, clock.peak_rss_mb,
                          smoothing.to_json() if smoothing else None, opset, accuracy, notes, verify_feeds)
