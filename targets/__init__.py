"""qcompile.targets — one module per deployment target, and the registry that names them.

A target declares what the pipeline needs to know about where the model will run:

    runtime              the runtime that serves it (qcompile.runtimes), which the result is verified and timed on
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
from typing import Callable, Literal

from qcompile.errors import UnknownNameError
from qcompile.passes.quant.annotate import QuantPolicy

Format = Literal["qdq", "matmulnbits", "blocked-dq"]
#: (keep_float, weight_dtype, per_channel, cache_dir) -> (policy, the measurements behind it)
PolicyFn = Callable[..., tuple[QuantPolicy, dict]]

#: name -> module defining TARGET (imported on first use: a target's dependencies cost nothing until asked for)
REGISTRY: dict[str, str] = {
    "ort-cpu": "qcompile.targets.ort_cpu",
    "onnx-qdq": "qcompile.targets.onnx_qdq",
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

    def accepts(self, fmt: str) -> bool:
        return fmt in self.formats


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
