"""Explicit-quantization placement for GPU compilers (TensorRT, its ONNX Runtime EP, MIGraphX).

These compilers fuse ``DQ -> Conv/MatMul/Gemm`` into one integer (or FP8) kernel and move Q/DQ
through data-movement ops themselves, so the graph states precision and nothing more:

    where        Q/DQ on EVERY input of Conv, ConvTranspose, MatMul, Gemm (activation and weight),
                 none on their outputs; residual ``Add(conv(x), skip)``: on ``skip`` only, so the
                 Add fuses into the Conv's epilogue (TensorRT); pooling, Reshape, Transpose and
                 Concat get no pairs of their own (the compiler commutes Q/DQ through them; extra
                 pairs split fusions); normalisations, Softmax and masks stay high precision;
                 attention MatMuls (activation x activation) only on request
    activations  per tensor, symmetric, zero point 0: INT8 (s = amax/127) or FP8 E4M3 (s = amax/448)
    weights      per output channel (Conv axis 0, ConvTranspose 1, MatMul the last, Gemm by transB),
                 symmetric, stored as INT8 / FP8 initializers with a DequantizeLinear. Not float with
                 a Q -> DQ pair: the compiler folds that pair into the same constant anyway, the file is
                 4x smaller, and the codes are exactly the ones qcompile computed (GPTQ, rounding)
    biases       float (the compiler adds them in the kernel's epilogue; an INT32 DQ is not an input
                 it takes)
    consumers    only the quantized node reads the DQ; other readers of the same tensor (a residual
                 stream's LayerNorm, say) keep the float tensor
    opsets       INT8 >= 13, FP8 >= 19, INT4 blocked DequantizeLinear 21, FP16 scales 19

Nothing is measured on this machine: the output is the same wherever it is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from qcompile.errors import InputSpecError
from qcompile.passes.quant.annotate import QuantPolicy, policy_for, weight_axis

ANNOTATORS = ("linear", "conv", "residual-skip")
#: the quantized element type of each static precision
PRECISION_DTYPES = {"int8": "int8", "fp8": "float8e4m3fn"}


def make_policy(name: str, annotators: tuple[str, ...] = ANNOTATORS):
    """The policy function of a target placing Q/DQ by the rules above."""

    def policy(*, keep_float: Iterable[str] | None = None, weight_dtype: str | None = None, per_channel: bool = True,
               cache_dir: Path | None = None, precision: str = "int8") -> tuple[QuantPolicy, dict]:
        if precision not in PRECISION_DTYPES:
            raise InputSpecError(f"target {name!r} has no static {precision} Q/DQ",
                                 fix=f"choose --precision from: {', '.join(PRECISION_DTYPES)}, int4, fp16")
        dtype = PRECISION_DTYPES[precision]
        if weight_dtype not in (None, dtype):
            raise InputSpecError(f"target {name!r} stores {precision} weights as {dtype}, not {weight_dtype}",
                                 fix="leave the weight dtype to the target")
        return policy_for(name, annotators, per_channel=per_channel, keep_float=frozenset(keep_float or ()),
                          weight_dtype=dtype, activation_dtype=dtype, activation_symmetric=True,
                          quantize_bias=False, dequantize_all_consumers=False), {}

    return policy


COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


def _producer_type(value) -> str | None:
    producer = value.producer() if value is not None else None
    return producer.op_type if producer is not None else None


def placement_violations(model) -> list[str]:
    """Every way ``model`` breaks the placement rules above, in words (empty: it follows them all).

    Checked: each compute op has Q/DQ on all its data inputs or on none (biases never; a MatMul with
    a blocked INT4 weight and a float activation is weight-only); weights are
    quantized initializers under a DequantizeLinear with per-channel scales on the output-channel axis
    (or blocks along K); activations per tensor; zero points 0; a QuantizeLinear never reads a compute
    op's output except for a residual Add's skip input; a dequantized activation feeds only compute
    ops and residual Adds (so nothing is quantized around pooling, Reshape, Transpose, Concat,
    Softmax or normalisations)."""
    import numpy as np

    problems: list[str] = []
    for node in model.graph:
        where = f"{node.op_type} {node.name!r}"
        if node.op_type in COMPUTE_OPS:
            data = [v for v in node.inputs[:2] if v is not None]
            from_dq = [_producer_type(v) == "DequantizeLinear" for v in data]
            if any(from_dq) and not all(from_dq) and not _weight_only(node):
                problems.append(f"{where}: Q/DQ on some of its inputs only")
            if len(node.inputs) > 2 and _producer_type(node.inputs[2]) == "DequantizeLinear":
                problems.append(f"{where}: its bias is quantized")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero = node.inputs[2] if len(node.inputs) > 2 else None
            zero = zero.const_value if zero is not None else None
            if zero is not None and np.any(zero.numpy().astype(np.float32)):
                problems.append(f"{where}: zero point is not 0")
            scale = node.inputs[1]
            is_weight = node.op_type == "DequantizeLinear" and node.inputs[0].const_value is not None
            per_tensor = scale.const_value is not None and scale.const_value.size == 1
            if not is_weight and not per_tensor:
                problems.append(f"{where}: an activation scale that is not per tensor")
        if node.op_type == "DequantizeLinear" and node.inputs[0].const_value is not None:
            problems += _weight_problems(node, where)
        if node.op_type == "QuantizeLinear":
            x = node.inputs[0]
            if x.const_value is not None:
                problems.append(f"{where}: quantizes a constant (weights are stored quantized)")
            readers = {user.op_type for dq, _ in node.outputs[0].uses() for user, _ in dq.outputs[0].uses()}
            if _producer_type(x) in COMPUTE_OPS and not readers <= {"Add"}:
                problems.append(f"{where}: Q/DQ on the output of {_producer_type(x)} (not a residual skip)")
        if node.op_type == "DequantizeLinear" and _producer_type(node.inputs[0]) == "QuantizeLinear":
            for user, _ in node.outputs[0].uses():
                if user.op_type not in COMPUTE_OPS | {"Add"}:
                    problems.append(f"{where}: a dequantized activation feeds {user.op_type} {user.name!r}")
    return problems


def _weight_only(node) -> bool:
    """A MatMul whose only dequantized input is a blocked weight (INT4 weight-only: activations stay float)."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    dq = w.producer() if w is not None else None
    return (node.op_type == "MatMul" and dq is not None and dq.op_type == "DequantizeLinear"
            and dq.inputs[0].const_value is not None and dq.attributes.get_int("block_size", 0) > 0
            and _producer_type(node.inputs[0]) != "DequantizeLinear")


def _weight_problems(dq, where: str) -> list[str]:
    """A weight DequantizeLinear's storage and axis against each compute op that reads it."""
    stored = dq.inputs[0].dtype.name if dq.inputs[0].dtype is not None else "?"
    if stored not in ("INT8", "FLOAT8E4M3FN", "INT4"):
        return [f"{where}: weights stored as {stored}"]
    problems = []
    scale = dq.inputs[1].const_value
    block = dq.attributes.get_int("block_size", 0)
    rank = len(dq.inputs[0].shape or ())
    for user, index in dq.outputs[0].uses():
        if user.op_type not in COMPUTE_OPS or index != 1:
            continue
        axis = dq.attributes.get_int("axis", 1) % max(rank, 1)
        if block:
            if user.op_type != "MatMul" or axis != 0:
                problems.append(f"{where}: weight blocks not along K of a MatMul")
        elif scale is not None and scale.size > 1 and axis != weight_axis(user, rank):
            problems.append(f"{where}: per-channel axis {axis}, not {user.op_type}'s output channels")
    return problems
