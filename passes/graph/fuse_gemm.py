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

from qcompile.passes.graph.rewrite import RuleSetPass

_GEMM_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


def _bias_fits(input_a: ir.Value, input_b: ir.Value, input_c: ir.Value, trans_a: bool, trans_b: bool) -> bool:
    """C must broadcast unidirectionally to Gemm's [M, N] (so Add could not have grown it)."""
    if input_c.dtype not in _GEMM_TYPES or input_c.shape is None or input_c.shape.rank() > 2:
        return False
    if input_a.shape is None or input_b.shape is None:
        return False
    m = input_a.shape[1 if trans_a else 0]
    n = input_b.shape[0 if trans_b else 1]
    for c_dim, out_dim in zip(reversed(list(input_c.shape)), (n, m)):
        if not (c_dim == 1 or (isinstance(c_dim, int) and c_dim == out_dim)):
            return False
    return True


def _narrowed(base: type) -> type:
    class Narrowed(base):  # type: ignore[misc, valid-type]
        def check(self, context, input_a, input_b, input_c, **kwargs):
            result = super().check(context, input_a, input_b, **kwargs)
            if not result:
                return result
            if not _bias_fits(input_a, input_b, input_c, self.trans_a, self.trans_b):
                return pattern.MatchResult().fail("bias does not broadcast to the [M, N] Gemm output", input_c)
            return result

    Narrowed.__name__ = base.__name__
    return Narrowed


_RULES = [
    _narrowed(cls).rule()
    for cls in (_gemm.MatMulAddToGemm, _gemm.TransAMatMulAddToGemm, _gemm.TransBMatMulAddToGemm,
                _gemm.TransABMatMulAddToGemm)
]


def fuse_gemm() -> ir.passes.PassBase:
    rules = pattern.RewriteRuleSet(_RULES, commute=True)
    return RuleSetPass("fuse-gemm", rules, anchors=frozenset({"MatMul"}))
