"""AMD MIGraphX (ROCm), through ONNX Runtime's MIGraphX EP or the ``migraphx`` module ROCm installs.

MIGraphX fuses a dot or convolution into an INT8 (or FP8) kernel only when BOTH its inputs come from
a DequantizeLinear, with symmetric INT8 (zero point 0): the explicit-Q/DQ placement of
qcompile.targets.explicit_qdq (every input of MatMul/Gemm/Conv, none on outputs), without the
TensorRT-specific residual rule. The rest runs FP16 by default. INT4 weights are not offered:
MIGraphX's blocked-DQ support is not confirmed here. The PyPI ``migraphx`` package is an empty
placeholder; the real module comes with ROCm.
"""

from __future__ import annotations

from qcompile.passes import CONTRIB_PASSES, DEFAULT_PIPELINE
from qcompile.targets import Target
from qcompile.targets.explicit_qdq import make_policy

ANNOTATORS = ("linear", "conv")

TARGET = Target(
    name="migraphx",
    description="AMD MIGraphX (ROCm): symmetric INT8 / FP8 Q/DQ on both inputs of each dot and convolution, FP16",
    runtime="migraphx",
    passes=tuple(p for p in DEFAULT_PIPELINE if p not in CONTRIB_PASSES),
    annotators=ANNOTATORS,
    formats=frozenset({"qdq"}),
    policy=make_policy("migraphx", ANNOTATORS),
    min_opset=13,
    strict_check=True,
    contrib_ops=False,
    precisions=frozenset({"fp32", "fp16", "bf16", "int8", "fp8"}),
    high_precision="fp16",
    device="gpu",
)
