"""ONNX Runtime's TensorRT execution provider: the same explicit Q/DQ and FP16 graph as the
``tensorrt`` target (the EP hands the graph to TensorRT's ONNX parser), served by onnxruntime-gpu.
The EP's own precision flags (trt_fp16_enable, trt_int8_enable) stay off: precision is in the graph."""

from __future__ import annotations

import dataclasses

from qcompile.targets.explicit_qdq import make_policy
from qcompile.targets.tensorrt import TARGET as TENSORRT

TARGET = dataclasses.replace(
    TENSORRT,
    name="ort-trt",
    description="ONNX Runtime TensorRT EP (onnxruntime-gpu): the tensorrt target's graph, engine cached on disk",
    runtime="ort-trt",
    policy=make_policy("ort-trt"),
)
