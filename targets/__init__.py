"""qcompile.targets — one module per deployment target, and the registry that names them.

A target declares what the pipeline needs to know about where the model will run:

    runtime              the runtime that serves it (qcompile.runtimes): what ``bench``/``compile`` use
    check_runtime        the runtime the pipeline verifies (and times) the result on here: ort-cpu, always
                         available; a GPU target's FP16/BF16 parts are emulated in FP32 there
    precisions           what it runs: fp32 | fp16 | bf16 (float) and int8 | fp8 | int4 (quantized)
    high_precision       what the unquantized part runs in by default (fp16 on GPUs, fp32 on CPUs)
    passes               its optimize pipeline: canonicalisation plus the fusions its runtime has kernels for
                         (no com.microsoft ops for a target whose runtime lacks them)
    annotators           the per-pattern annotators that decide WHERE Q/DQ goes (passes/quant/annotate.py)
    formats              the quantized forms it accepts: qdq, matmulnbits, blocked-dq
    calibration_runtime  ort-cpu for every target: calibration is arithmetic, not deployment
    policy(...)          activation/weight dtypes and what stays float (measured where the target measures)

Adding a target is one module exporting ``TARGET`` and one line in :data:`REGISTRY`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, get_args

from qcompile.errors import UnknownNameError
from qcompile.passes.quant.annotate import QuantPolicy

Format = Literal["qdq", "matmulnbits", "blocked-dq"]
Precision = Literal["fp32", "fp16", "bf16", "int8", "fp8", "int4"]
HighPrecision = Literal["fp32", "fp16", "bf16"]
#: The option lists, one source each (the CLI's choices and the recipe's validation read these).
PRECISIONS: tuple[str, ...] = get_args(Precision)
HIGH_PRECISIONS: tuple[str, ...] = get_args(HighPrecision)
#: ONNX element type of each float precision
FLOAT_TYPES = {"fp16": "float16", "bf16": "bfloat16"}
#: (keep_float, weight_dtype, per_channel, cache_dir, precision) -> (policy, the measurements behind it)
PolicyFn = Callable[..., tuple[QuantPolicy, dict]]

#: name -> module defining TARGET (imported on first use: a target's dependencies cost nothing until asked for)
REGISTRY: dict[str, str] = {
    "ort-cpu": "qcompile.targets.ort_cpu",
    "onnx-qdq": "qcompile.targets.onnx_qdq",
    "tensorrt": "qcompile.targets.tensorrt",
    "ort-trt": "qcompile.targets.ort_trt",
    "ort-cuda": "qcompile.targets.ort_cuda",
    "migraphx": "qcompile.targets.migraphx",
}


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    runtime: str
    passes: tuple[str, ...]
    annotators: tuple[str, ...]
    formats: frozenset[str]
    policy: PolicyFn
    calibration_runtime: str = "ort-cpu"
    min_opset: int = 10  # the least opset its Q/DQ may be written in (per-channel needs 13 everywhere)
    strict_check: bool = False  # the ONNX checker's full check (shape inference included) on its outputs
    contrib_ops: bool = True  # whether com.microsoft ops may appear in its output
    check_runtime: str = "ort-cpu"
    precisions: frozenset[str] = frozenset({"fp32", "int8", "int4"})
    high_precision: HighPrecision = "fp32"
    device: Literal["cpu", "gpu"] = "cpu"
    symmetric_blocks: bool = False  # blocked weights must have zero points 0 (TensorRT)

    def accepts(self, fmt: str) -> bool:
        return fmt in self.formats

    def require_precision(self, precision: str) -> None:
        """An InputSpecError naming what this target runs, unless it runs ``precision``."""
        if precision not in self.precisions:
            from qcompile.errors import InputSpecError

            order = [p for p in PRECISIONS if p in self.precisions]
            raise InputSpecError(f"target {self.name!r} does not run {precision}",
                                 fix=f"choose --precision from: {', '.join(order)}")


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Target:
    """The registered target ``name``; an unknown name lists the known ones."""
    try:
        module = REGISTRY[name]
    except KeyError:
        raise UnknownNameError(f"unknown target {name!r}", fix=f"choose from: {', '.join(REGISTRY)}") from None
    return importlib.import_module(module).TARGET


def probe_dir(cache_dir: Path | None) -> Path | None:
    return None if cache_dir is None else Path(cache_dir) / "probe"
