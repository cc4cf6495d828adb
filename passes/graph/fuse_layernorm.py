"""LayerNormalization fused from its decomposed form (onnxscript's rules, opset 17+).

    m = ReduceMean(x, -1);  d = x - m;  v = ReduceMean(d*d, -1)
    y = d / sqrt(v + eps) * scale (+ bias)   ->   LayerNormalization(x, scale, bias, epsilon=eps)

onnxscript matches ReduceMean with ``axes`` as an input (opset 18+). Opset 17 carries ``axes`` as
an attribute, so the same rule is restated for that form here.

LayerNormalization's output has x's shape; the decomposed form's is x's broadcast with scale, bias
and epsilon. Every rule is narrowed to scale, bias and epsilon that vary along x's last axis at
most (rank <= x's, every other dim 1): then both shapes agree, and every runtime's LayerNorm takes
them (ORT refuses a scale of higher rank than x).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.fusion import _layer_norm

from qcompile.passes.graph.rewrite import RuleSetPass


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


def _along_last_axis(x: ir.Value, t: ir.Value) -> bool:
    """``t`` (a scale, bias or epsilon) broadcasts to x's shape varying along x's last axis at most."""
    if x.shape is None or t.shape is None or t.shape.rank() > x.shape.rank():
        return False
    dims = list(t.shape)
    return all(d == 1 for d in dims[:-1]) and (not dims or dims[-1] == 1 or dims[-1] == x.shape[-1])


def _narrowed(base: type) -> type:
    class Narrowed(base):  # type: ignore[misc, valid-type]
        def check(self, context, x, **kwargs):
            result = super().check(context, x=x, **kwargs)
            if not result:
                return result
            for name in ("scale", "bias", "epsilon"):
                if kwargs.get(name) is not None and not _along_last_axis(x, kwargs[name]):
                    return pattern.MatchResult().fail(f"{name} does not vary along x's last axis only", kwargs[name])
            return result

    Narrowed.__name__ = base.__name__
    return Narrowed


_RULES = pattern.RewriteRuleSet(
    [_narrowed(cls).rule()
     for cls in (_layer_norm.LayerNormFusion, _layer_norm.LayerNormBiasFusion, _LayerNormAxesAttribute)],
    commute=True,
)


class LayerNormFusionPass(RuleSetPass):
    """Skips models below opset 17, where LayerNormalization does not exist."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if model.opset_imports.get("", 0) < 17:
            self.count = 0
            return ir.passes.PassResult(model, False)
        return super().call(model)


def fuse_layernorm() -> ir.passes.PassBase:
    # Every rule starts from a ReduceMean (decomposed form) or a LayerNormalization (bias folded in).
    anchors = frozenset({"ReduceMean", "LayerNormalization"})
    return LayerNormFusionPass("fuse-layernorm", _RULES, anchors=anchors)
