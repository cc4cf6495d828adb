"""ONNX Runtime's CUDA execution provider: the FP32 / FP16 baseline on NVIDIA GPUs.

The CUDA EP has no INT8 convolution kernels, and QDQ models usually run slower there than FP32, so
this target takes no static Q/DQ: FP16 through the mixed-precision pass (the default), FP32, or INT4
weights as MatMulNBits (which the CUDA EP runs). Use ``ort-trt`` or ``tensorrt`` for INT8 / FP8.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from qcompile.errors import InputSpecError
from qcompile.passes import ORT_GPU_PIPELINE
from qcompile.passes.quant.annotate import QuantPolicy
from qcompile.targets import Target


def policy(*, keep_float: Iterable[str] | None = None, weight_dtype: str | None = None, per_channel: bool = True,
           cache_dir: Path | None = None, precision: str = "int8") -> tuple[QuantPolicy, dict]:
    raise InputSpecError("target 'ort-cuda' takes no static Q/DQ: the CUDA EP has no INT8 conv kernels and runs "
                         "QDQ models slower than FP16",
                         fix="use --precision fp16 or int4 there, or --target ort-trt / tensorrt for int8 and fp8")


TARGET = Target(
    name="ort-cuda",
    description="ONNX Runtime CUDA EP (onnxruntime-gpu): the FP16 baseline, INT4 weights as MatMulNBits",
    runtime="ort-cuda",
    passes=ORT_GPU_PIPELINE,
    annotators=(),
    formats=frozenset({"matmulnbits"}),
    policy=policy,
    precisions=frozenset({"fp32", "fp16", "bf16", "int4"}),
    high_precision="fp16",
    device="gpu",
)
