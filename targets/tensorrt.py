"""TensorRT (10.x and 11.x): strongly typed engines whose every precision is written in the ONNX graph.

TensorRT 11 has no precision builder flags and no INT8 calibrators: Q/DQ in the graph decides what
runs in INT8 / FP8 / INT4, and FP16 (or BF16) tensors decide the rest. The placement rules are
qcompile.targets.explicit_qdq's; what is not quantized runs in FP16 by default (``high_precision``,
written by the mixed-precision pass), graph inputs and outputs stay FP32.

Formats: standard Q/DQ (INT8, FP8 E4M3) and blocked DequantizeLinear (INT4 weight-only, opset 21,
block 128, symmetric: TensorRT takes zero points 0 only). No com.microsoft operators.

Here (no GPU) the model is verified on ONNX Runtime CPU with its FP16 parts emulated in FP32
(passes/quant/emulate.py); ``qcompile compile --target tensorrt`` builds the engine where TensorRT is.
"""

from __future__ import annotations

from qcompile.passes import CONTRIB_PASSES, DEFAULT_PIPELINE
from qcompile.targets import Target
from qcompile.targets.explicit_qdq import ANNOTATORS, make_policy

TARGET = Target(
    name="tensorrt",
    description="TensorRT engines: explicit Q/DQ (INT8, FP8, INT4 weights), the rest FP16 (strongly typed)",
    runtime="tensorrt",
    passes=tuple(p for p in DEFAULT_PIPELINE if p not in CONTRIB_PASSES),
    annotators=ANNOTATORS,
    formats=frozenset({"qdq", "blocked-dq"}),
    policy=make_policy("tensorrt"),
    min_opset=13,
    strict_check=True,
    contrib_ops=False,
    precisions=frozenset({"fp32", "fp16", "bf16", "int8", "fp8", "int4"}),
    high_precision="fp16",
    device="gpu",
    symmetric_blocks=True,
)
