"""qcompile: an ONNX graph-rewriting compiler with verified passes and measured results.

    import qcompile
    model = qcompile.load("model.onnx")
    model = qcompile.optimize(model, verify=True)
    qcompile.save(model, "model.opt.onnx")
    result = qcompile.quantize("model.onnx", reader, recipe="int8", target="ort-cpu")
"""

from __future__ import annotations

from qcompile.errors import CheckFailedError, QCompileError, VerificationError
from qcompile.modelio import convert_opset, load, save
from qcompile.passmanager import PassManager, PassManagerResult, PassStats, VerifyOptions
from qcompile.pipeline import Pipeline, Result, optimize, optimize_with_stats, quantize

__version__ = "0.1.0"

__all__ = [
    "CheckFailedError",
    "PassManager",
    "PassManagerResult",
    "PassStats",
    "Pipeline",
    "QCompileError",
    "Result",
    "VerificationError",
    "VerifyOptions",
    "convert_opset",
    "load",
    "optimize",
    "optimize_with_stats",
    "quantize",
    "save",
]
