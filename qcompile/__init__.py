"""qcompile: an ONNX graph-rewriting compiler with verified passes and measured results.

    import qcompile
    model = qcompile.load("model.onnx")
    model = qcompile.optimize(model, verify=True)
    qcompile.save(model, "model.opt.onnx")
"""

from __future__ import annotations

from qcompile.errors import CheckFailedError, QCompileError, VerificationError
from qcompile.modelio import convert_opset, load, save
from qcompile.passmanager import PassManager, PassManagerResult, PassStats, VerifyOptions
from qcompile.pipeline import optimize, optimize_with_stats

__version__ = "0.1.0"

__all__ = [
    "CheckFailedError",
    "PassManager",
    "PassManagerResult",
    "PassStats",
    "QCompileError",
    "VerificationError",
    "VerifyOptions",
    "convert_opset",
    "load",
    "optimize",
    "optimize_with_stats",
    "save",
]
