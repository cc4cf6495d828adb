"""Portable standard QDQ for any runtime: the ONNX standard's operators only.

    activations  int8 symmetric, zero point 0, per tensor
    weights      int8 symmetric, zero point 0, per output channel (Conv axis 0, ConvTranspose 1,
                 MatMul the last axis, Gemm by transB)
    biases       int32, s_b = s_x * s_w, zero point 0
    opset        >= 13 (raised, verified, when the model is older); weight-only as blocked
                 DequantizeLinear (opset 21), never MatMulNBits
    contrib ops  none: fusions that emit com.microsoft ops are left out, and the output is checked
                 by the ONNX checker's strictest mode (full_check: shape inference included)

Nothing is measured on the machine (no kernel probe): the output is the same wherever it is made.
It is verified on ONNX Runtime CPU, which runs standard QDQ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from qcompile.passes import CONTRIB_PASSES, DEFAULT_PIPELINE
from qcompile.passes.quant.annotate import QuantPolicy, policy_for
from qcompile.targets import Target

ANNOTATORS = ("linear", "conv", "conv-output", "passthrough", "concat")


def policy(*, keep_float: Iterable[str] | None = None, weight_dtype: str | None = None, per_channel: bool = True,
           cache_dir: Path | None = None, precision: str = "int8") -> tuple[QuantPolicy, dict]:
    return policy_for("onnx-qdq", ANNOTATORS, per_channel=per_channel, keep_float=frozenset(keep_float or ()),
                      weight_dtype="int8", activation_dtype="int8", activation_symmetric=True), {}


TARGET = Target(
    name="onnx-qdq",
    description="portable standard QDQ (symmetric INT8, zero points 0, no contrib ops) for any runtime",
    runtime="ort-cpu",
    passes=tuple(p for p in DEFAULT_PIPELINE if p not in CONTRIB_PASSES),
    annotators=ANNOTATORS,
    formats=frozenset({"qdq", "blocked-dq"}),
    policy=policy,
    min_opset=13,
    strict_check=True,
    contrib_ops=False,
)
