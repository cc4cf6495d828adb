"""LayerNormalization fused from its decomposed form (onnxscript's rules, opset 17+).

    m = ReduceMean(x, -1);  d = x - m;  v = ReduceMean(d*d, -1)
    y = d / sqrt(v + eps) * scale (+ bias)   ->   LayerNormalization(x, scale, bias, epsilon=eps)

onnxscript matches ReduceMean with ``axes`` as an input (opset 18+). Opset 17 carries ``axes`` as
an attribute, so the same rule is restated for that form here.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.fusion import _layer_norm

from qcompile.passes._rewrite import RuleSetPass


class _LayerNormAxesAttribute(_layer_norm.LayerNormFusion):
    """The opset-17 form: ReduceMean(x, axes=[-1]) with axes as an attribute."""

    def pattern(self, op, x, scale, epsilon):
        mean = op.ReduceMean(x, axes=[-1], keepdims=1)
        deviation = op.Sub(x, mean)
        squared = pattern.OrValue([op.Mul(deviation, deviation), op.Pow(deviation, 2)])
        variance = op.ReduceMean(squared, axes=[-1], keepdims=1)
        std_dev = op.Sqrt(op.Add(variance, epsilon))
        normalized = pattern.OrValue(
            [op.Mul(deviation, op.Reciprocal(std_dev)), op.Div(deviation, std_dev)]
        )
        return op.Mul(normalized, scale)


_RULES = pattern.RewriteRuleSet(
    [*_layer_norm.layer_normalization_rules, _LayerNormAxesAttribute.rule()], commute=True
)


class LayerNormFusionPass(RuleSetPass):
    """Skips models below opset 17, where LayerNormalization does not exist."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if model.opset_imports.get("", 0) < 17:
            self.count = 0
            return ir.passes.PassResult(model, False)
        return super().call(model)


def fuse_layernorm() -> ir.passes.PassBase:
    return LayerNormFusionPass("fuse-layernorm", _RULES)
