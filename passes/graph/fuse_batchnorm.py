"""BatchNormalization folded into the preceding Conv / ConvTranspose / Gemm (onnxscript's rules).

    y = gamma * (W x + b - mean) / sqrt(var + eps) + beta
      = (s W) x + (s (b - mean) + beta),     s = gamma / sqrt(var + eps)   (per output channel)
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
)

from qcompile.passes.graph.rewrite import RuleSetPass


def fuse_batchnorm() -> ir.passes.PassBase:
    return RuleSetPass(
        "fuse-batchnorm",
        [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule],
        anchors=frozenset({"BatchNormalization"}),
    )
