"""Weight-only quantization (W8A16 / W4A16): RTN, or GPTQ with Hessians from calibration data.

The Hessian of a MatMul's input X [*, K] is accumulated over the calibration feeds in one
streaming pass (H += X^T X; nodes sharing an input share H), then every weight is quantized by
passes/gptq.py and lowered by passes/weight_only.py.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qcompile import specs, targets
from qcompile.cache import cache_root
from qcompile.calibrate import collect
from qcompile.calibration import CalibrationReader, iter_feeds
from qcompile.errors import InputModelError, InputSpecError, UnknownNameError
from qcompile.memory import PhaseClock
from qcompile.metrics import Comparison
from qcompile.opsets import QDQ_BLOCKED, OpsetChange, ensure_opset, opset_of
from qcompile.passes import make_pass
from qcompile.passes.quant.nbits import (
    WeightOnlyConfig,
    WeightOnlyPass,
    candidates,
    embedding_candidates,
    tied_heads,
)
from qcompile.passmanager import PassManager, VerifyOptions
from qcompile.precision import PrecisionReport, lower_precision
from qcompile.progress import bar
from qcompile.quant.algorithms.gptq import gptq
from qcompile.quant.algorithms.rtn import block_codes
from qcompile.quant.spec import BlockCodes
from qcompile.quant.statistics import Hessian
from qcompile.recipes import Algorithm
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
class WeightOnlyResult:
    model: ir.Model
    config: WeightOnlyConfig
    algorithm: str
    quantized: list[str] = field(default_factory=list)  # MatMul nodes
    phase_seconds: dict[str, float] = field(default_factory=dict)
    embeddings: list[str] = field(default_factory=list)  # Gather nodes
    awq: dict | None = None  # AWQ's groups and chosen alphas
    opset: OpsetChange | None = None
    accuracy: Comparison | None = None  # the quantized model vs the float one, on the verification feeds
    notes: list[str] = field(default_factory=list)
    verification_feeds: list = field(default_factory=list, repr=False)
    phase_peak_rss_mb: dict[str, float] = field(default_factory=dict)
    latency: dict | None = None  # the speed guard: qcompile.bench.guard_report
    high_precision: PrecisionReport | None = None  # the unquantized part in FP16/BF16 (GPU targets)

    @property
    def timing_feed(self) -> dict | None:
        return self.verification_feeds[0] if self.verification_feeds else None

    def to_json(self) -> dict:
        c = self.config
        return {"bits": c.bits, "block_size": c.block_size, "symmetric": c.symmetric, "format": c.format,
                "include_lm_head": c.include_lm_head, "include_embeddings": c.include_embeddings,
                "lm_head_bits": c.lm_head_bits, "lm_head_block_size": c.lm_head_block_size,
                "accuracy_level": c.accuracy_level, "algorithm": self.algorithm,
                "quantized_matmuls": len(self.quantized), "quantized_embeddings": len(self.embeddings), "awq": self.awq,
                "opset": self.opset.to_json() if self.opset else None,
                "accuracy_vs_float": self.accuracy.to_json() if self.accuracy else None,
                "high_precision": self.high_precision.to_json() if self.high_precision else None,
                "notes": list(self.notes)}


def tied_hessian(hessian: np.ndarray) -> np.ndarray:
    """GPTQ's objective for a weight that is also the embedding table (tied, one set of codes):
    ||X (W - Q)||^2 / mean(diag H) + ||W - Q||^2 / 1, i.e. H / mean(diag H) + I — the head's output
    error and the embedding rows' error, each per unit of its own average input energy."""
    scale = float(np.mean(np.diag(hessian))) or 1.0
    return hessian / scale + np.eye(hessian.shape[0], dtype=hessian.dtype)


def collect_hessians(model: ir.Model, nodes: list[ir.Node], reader: CalibrationReader,
                     samples: int | None = None) -> dict[str, np.ndarray]:
    """H = sum X^T X per distinct MatMul input, from the one calibration loop."""
    hessians = {name: Hessian() for name in sorted({n.inputs[0].name for n in nodes})}
    collect(model, {name: [h] for name, h in hessians.items()}, reader, samples=samples, label="Hessians of")
    return {name: h.h for name, h in hessians.items()}


def quantize_weights(
    model_or_path: ir.Model | str,
    config: WeightOnlyConfig,
    *,
    algorithm: Algorithm = "rtn",
    reader: CalibrationReader | None = None,
    samples: int | None = None,
    optimize: bool = True,
    verify_options=None,
    target: str = "ort-cpu",
    clock: PhaseClock | None = None,
    guard_runs: int | str | None = None,
    high_precision: str = "fp32",
    exclude: tuple[str, ...] = (),
) -> WeightOnlyResult:
    """Block-wise weight-only quantization of every eligible MatMul (in place for an ir.Model);
    ``high_precision`` (fp32 | fp16 | bf16): what the rest runs in (qcompile.precision), ``exclude``
    the nodes it keeps FP32.

    ``config.accuracy_level`` None (MatMulNBits): the level that decodes faster on this CPU, measured
    once by :func:`qcompile.targets.ort_cpu.kernel_probe.probe_nbits`.
    """
    clock = clock or PhaseClock()
    target_spec = targets.get(target)  # an unknown target fails before anything is loaded
    if target_spec.symmetric_blocks and not config.symmetric:
        raise InputSpecError(f"target {target!r} takes symmetric weight blocks only (zero points 0)",
                             fix="drop --asymmetric")
    verify_options = verify_options or VerifyOptions(each_pass=False)
    float_model, original = prepare(model_or_path, target, verify_options, guard_runs, clock, optimize=optimize,
                                    reader=reader)
    if float_model.bound is not None:  # the optimized model, checked before its weights are rounded
        try:
            check_optimized_model(float_model, target)
        except OptimizedModelChanged as exc:
            log.warning("the optimized model fails its check (%s); verifying each pass", exc)
            float_model = reverify_passes(original, float_model, verify_options, target)
        clock.lap("check")
    model, verify_feeds, notes = float_model.model, float_model.feeds, float_model.notes
    if config.format == "matmulnbits" and not target_spec.accepts("matmulnbits"):
        config = dataclasses.replace(config, format="dq", accuracy_level=None)
        notes.append(f"target {target_spec.name} takes no MatMulNBits: weights lowered as blocked DequantizeLinear")
    if config.format == "matmulnbits" and config.accuracy_level is None:
        from qcompile.targets.ort_cpu import fastest_accuracy_level

        config = dataclasses.replace(config, accuracy_level=fastest_accuracy_level(config.bits, config.block_size,
                                                                                   cache_root()))
    opset = OpsetChange(opset_of(model), opset_of(model), "kept")
    if config.format == "dq":
        model, opset = ensure_opset(model, QDQ_BLOCKED, verify_feeds, "blocked DequantizeLinear needs opset 21")
        if not opset.ok:
            raise InputModelError(f"cannot write blocked DequantizeLinear into this opset-{opset.before} model: "
                                  f"{opset.reason}", fix="use --format matmulnbits, or re-export at opset 21")
        if opset.action == "upgraded":
            notes.append(f"opset {opset.before} -> {opset.after} (verified): {opset.reason}")
    clock.lap("opset")
    precomputed: dict[str, BlockCodes] = {}
    awq_report = None
    if algorithm == "gptq":
        if reader is None:
            raise InputSpecError("GPTQ needs calibration data", fix="pass --calib SPEC (a reader from Python)")
        model = PassManager([make_pass("shape-inference")])(model).model  # verified exactly (structure unchanged)
        nodes = candidates(model, config)
        clock.lap("annotate")
        hessians = collect_hessians(model, nodes, reader, samples)
        clock.lap("observe")
        tied = {id(head) for _, head in tied_heads(nodes, embedding_candidates(model, config)).values()}
        with bar("GPTQ", total=len(nodes)) as advance:
            for node in nodes:
                w = node.inputs[1]
                hessian = hessians[node.inputs[0].name]
                if id(node) in tied and config.format == "matmulnbits":
                    hessian = tied_hessian(hessian)
                precomputed[w.name] = gptq(w.const_value.numpy(), hessian, config.bits_for(node),
                                           config.block_for(node), config.symmetric)
                advance()
        clock.lap("gptq")
    elif algorithm == "awq":
        if reader is None:
            raise InputSpecError("AWQ needs calibration data", fix="pass --calib SPEC (a reader from Python)")
        from qcompile.awq import awq

        feeds = list(iter_feeds(reader, specs.input_specs(model), samples))
        scaled = awq(model, feeds, config)
        model, precomputed, awq_report = scaled.model, scaled.codes, scaled.to_json()
        clock.lap("awq")
    elif algorithm != "rtn":
        raise UnknownNameError(f"unknown weight-only algorithm {algorithm!r}", fix="use rtn, gptq or awq")
    lowering = WeightOnlyPass(config, block_codes(config.bits, config.block_size, config.symmetric, precomputed))
    model = PassManager([lowering, make_pass("dead-code"), make_pass("clear-shapes")])(model).model
    if not lowering.quantized and not lowering.embeddings:
        notes.append("nothing to quantize: no MatMul with a constant weight fits the weight-only recipe; the "
                     "optimized float model is the result")
    clock.lap("lower")
    model, lowered = lower_precision(model, high_precision, verify_feeds, exclude)
    stage = "weight-only lowering" if lowered is None else "weight-only lowering and mixed-precision"
    accuracy, latency = check_result(model, float_model, stage, target, guard_runs, clock)
    notes += check_lowering(accuracy, stage)
    return WeightOnlyResult(model, config, algorithm, lowering.quantized, clock.seconds, lowering.embeddings,
                            awq_report, opset, accuracy, notes, verify_feeds, clock.peak_rss_mb, latency, lowered)
