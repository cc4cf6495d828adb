"""The float recipe (``fp16``): no quantization, the whole model in FP16 or BF16 where its ranges allow.

    prepare (load, reference, optimize) -> check the optimized model -> mixed precision (measured on
    the verification feeds: qcompile.precision) -> check (ONNX checker, run with FP16 emulated on ORT
    CPU, compared with the original's outputs)

What most GPU deployments run, with or without INT8/FP8 parts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx_ir as ir

from qcompile.memory import PhaseClock
from qcompile.metrics import Comparison
from qcompile.passmanager import VerifyOptions
from qcompile.precision import PrecisionReport, lower_precision
from qcompile.stages import (
    OptimizedModelChanged,
    check_lowering,
    check_optimized_model,
    check_result,
    prepare,
    reverify_passes,
)

log = logging.getLogger(__name__)


@dataclass
class FloatResult:
    model: ir.Model
    high_precision: PrecisionReport | None
    accuracy: Comparison | None = None  # the converted model vs the original, on the verification feeds
    notes: list[str] = field(default_factory=list)
    verification_feeds: list = field(default_factory=list, repr=False)
    latency: dict | None = None

    @property
    def timing_feed(self) -> dict | None:
        return self.verification_feeds[0] if self.verification_feeds else None

    def to_json(self) -> dict:
        return {"high_precision": self.high_precision.to_json() if self.high_precision else None,
                "accuracy_vs_float": self.accuracy.to_json() if self.accuracy else None, "notes": list(self.notes)}


def convert_float(model_or_path: ir.Model | str, high_precision: str, *, target: str,
                  exclude: tuple[str, ...] = (), verify_options: VerifyOptions | None = None,
                  guard_runs: int | str | None = None, clock: PhaseClock | None = None) -> FloatResult:
    """``model`` optimized for ``target`` and converted to ``high_precision`` (fp16 | bf16 | fp32),
    ``exclude`` (node names, op types, patterns) kept FP32; checked end to end."""
    clock = clock or PhaseClock()
    verify_options = verify_options or VerifyOptions(each_pass=False)
    float_model, original = prepare(model_or_path, target, verify_options, guard_runs, clock)
    if float_model.bound is not None:  # the optimized model, checked before it is converted
        try:
            check_optimized_model(float_model, target)
        except OptimizedModelChanged as exc:
            log.warning("the optimized model fails its check (%s); verifying each pass", exc)
            float_model = reverify_passes(original, float_model, verify_options, target)
        clock.lap("check")
    model, report = lower_precision(float_model.model, high_precision, float_model.feeds, exclude)
    clock.lap("high_precision")
    accuracy, latency = check_result(model, float_model, "mixed-precision", target, guard_runs, clock)
    notes = float_model.notes + check_lowering(accuracy, "mixed-precision")
    return FloatResult(model, report, accuracy, notes, float_model.feeds, latency)
