"""MatMul + Add -> Gemm, only where Gemm means exactly the same thing.

    Add(MatMul(A, B), C)                       -> Gemm(A, B, C)
    Add(MatMul(Transpose(A), B), C)            -> Gemm(A, B, C, transA=1)
    Add(MatMul(A, Transpose(B)), C)            -> Gemm(A, B, C, transB=1)
    Add(MatMul(Transpose(A), Transpose(B)), C) -> Gemm(A, B, C, transA=1, transB=1)

onnxscript's rules check that A and B are 2-D. Gemm also requires that C broadcasts
*unidirectionally* to the [M, N] result (Add would otherwise grow the output) and a float type,
so each rule is narrowed here with that check.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import _matmul_add_to_gemm as _gemm

from qcompile.passes._rewrite import RuleSetPass

_GEMM_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


def _bias_fits(input_c: ir.Value, result: ir.Value | None) -> bool:
    shape = input_c.shape
    if shape is None or shape.rank() > 2 or input_c.dtype not in _GEMM_TYPES:
        return False
    if result is None or result.shape is None or result.shape.rank() != 2:
        return False
    for c_dim, out_dim in zip(reversed(list(shape)), reversed(list(result.shape))):
        if not (c_dim == 1 or (isinstance(c_dim, int) and c_dim == out_dim)):
            return False
    return True


def _narrowed(base: type) -> type:
    class Narrowed(base):  # type: ignore[misc, valid-type]
        def check(self, context, input_a, input_b, input_c, **kwargs):
            result = super().check(context, input_a, input_b, **kwargs)
            if not result:
                return result
            out = context.root.outputs[0] if getattr(context, "root", None) is not None else None
            if not _bias_fits(input_c, out):
                return pattern.MatchResult().fail("bias does not broadcast to the [M, N] Gemm output", input_c)
            return result

    Narrowed.__name__ = base.__name__
    return Narrowed


_RULES = [
    _narrowed(cls).rule()
    for cls in (_gemm.MatMulAddToGemm, _gemm.TransAMatMulAddToGemm, _gemm.TransBMatMulAddToGemm, _gemm.TransABMatMulAddToGemm)
]


def fuse_gemm() -> ir.passes.PassBase:
    return RuleSetPass("fuse-gemm", pattern.RewriteRuleSet(_RULES, commute=True))
