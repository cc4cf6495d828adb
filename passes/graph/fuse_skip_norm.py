"""Residual add + normalisation fused into ONNX Runtime's skip-norm kernels (com.microsoft).

    s = a + b;  y = s / sqrt(mean(s^2, -1) + eps) * w     ->  y, s = SkipSimplifiedLayerNormalization(a, b, w)
    s = a + b;  y = LayerNormalization(s, w, beta)        ->  y, s = SkipLayerNormalization(a, b, w, beta)

RMSNorm is matched in the forms exporters write: ``s*s`` or ``Pow(s, 2)``; ReduceMean with axes as
an attribute (opset < 18) or an input; ``s / sqrt(.)``, ``s * (1 / sqrt(.))`` or ``s * Reciprocal(sqrt(.))``.
The sum ``s`` stays available as the fused node's fourth output (the next residual reads it). The
LayerNorm form is onnxscript's rule (``ort_fusions.skip_normalization``). An RMSNorm with no
residual add before it (a decoder's first norm) stays decomposed: its ORT kernel
(SimplifiedLayerNormalization) sits in the ONNX domain, where the ONNX checker rejects it.
Two passes, ``fuse-skip-norm`` (RMSNorm) and ``fuse-skip-layernorm`` (LayerNorm, ORT's GPU providers only), for
ONNX Runtime targets (``CONTRIB_PASSES``). Shapes must be known: a, b [B, S, D], w [D].
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions import skip_normalization

from qcompile.passes.graph.rewrite import RuleSetPass


def _scalar(value: ir.Value | None) -> float | None:
    const = None if value is None else ir.convenience.get_const_tensor(value)
    if const is None or const.size != 1:
        return None
    return float(const.numpy().reshape(()))


def _last_axis(axes: list[int], rank: int | None) -> bool:
    return len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


class SkipRmsNorm(pattern.RewriteRuleClassBase):
    """Add + RMSNorm -> SkipSimplifiedLayerNormalization; ``axes_input`` for the opset-18 ReduceMean."""

    def __init__(self, name: str, squared: str, normalised: str, axes_input: bool) -> None:
        super().__init__(name)
        self.squared, self.normalised, self.axes_input = squared, normalised, axes_input

    def pattern(self, op, a, b, two, axes, eps, one, w):
        s = op.Add(a, b)
        squared = op.Pow(s, two) if self.squared == "pow" else op.Mul(s, s)
        if self.axes_input:
            mean = op.ReduceMean(squared, axes, _allow_other_attributes=True, _outputs=["mean"])
        else:
            mean = op.ReduceMean(squared, _allow_other_attributes=True, _outputs=["mean"])
        root = op.Sqrt(op.Add(mean, eps))
        if self.normalised == "div":
            normed = op.Div(s, root)
        elif self.normalised == "reciprocal":
            normed = op.Mul(s, op.Reciprocal(root))
        else:
            normed = op.Mul(s, op.Div(one, root))
        return op.Mul(normed, w), s

    def check(self, context, a, b, two, axes, eps, one, w, mean, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if self.squared == "pow" and _scalar(two) != 2.0:
            return result.fail("exponent is not 2", two)
        if self.normalised == "one-over" and _scalar(one) != 1.0:
            return result.fail("numerator is not 1", one)
        if _scalar(eps) is None:
            return result.fail("epsilon is not a constant scalar", eps)
        rank = a.shape.rank() if a.shape is not None else None
        if self.axes_input:
            const = ir.convenience.get_const_tensor(axes)
            axis_list = None if const is None else [int(x) for x in const.numpy().reshape(-1)]
        else:
            attr = mean.producer().attributes.get("axes")
            axis_list = None if attr is None else list(attr.as_ints())
        if mean.producer().attributes.get_int("keepdims", 1) != 1:
            return result.fail("ReduceMean drops the axis", mean)
        if axis_list is None or not _last_axis(axis_list, rank):
            return result.fail("ReduceMean is not over the last axis only", mean)
        if a.shape is None or b.shape is None or rank != 3 or list(a.shape) != list(b.shape):
            return result.fail("a and b are not both [B, S, D] of one shape", a)
        width = a.shape[-1]
        if not isinstance(width, int) or w.shape is None or list(w.shape) != [width] or w.const_value is None:
            return result.fail("w is not a constant [D]", w)
        return result

    def rewrite(self, op, a, b, eps, w, **_):
        normalised, _mean, _inv_std, total = op.SkipSimplifiedLayerNormalization(
            a, b, w, epsilon=_scalar(eps), _outputs=4, _domain="com.microsoft")
        return normalised, total


_RMS_RULES = [
    SkipRmsNorm.rule(f"skip-rms-{squared}-{normalised}-{'input' if axes_input else 'attr'}",
                     squared, normalised, axes_input)
    for squared in ("pow", "mul") for normalised in ("div", "reciprocal", "one-over") for axes_input in (False, True)
]


def fuse_skip_norm() -> ir.passes.PassBase:
    """Add + RMSNorm -> SkipSimplifiedLayerNormalization."""
    rules = pattern.RewriteRuleSet(_RMS_RULES, commute=True)
    return RuleSetPass("fuse-skip-norm", rules, anchors=frozenset({"ReduceMean"}))


def fuse_skip_layernorm() -> ir.passes.PassBase:
    """Add + LayerNormalization -> SkipLayerNormalization (onnxscript's rules match both Add orders
    themselves; commuting them again fails on their OrValue). Not in ort-cpu's pipeline: ONNX Runtime
    1.32's CPU SkipLayerNormalization kernel is 3.7-5.5x slower than Add + LayerNormalization at 128 rows
    (tools/bench_skip_norm.py, docs/benchmarks.md); ORT itself fuses it only for GPU providers."""
    rules = pattern.RewriteRuleSet(skip_normalization.skip_layer_normalization_ruleset.rules)
    return RuleSetPass("fuse-skip-layernorm", rules, anchors=frozenset({"LayerNormalization"}))
