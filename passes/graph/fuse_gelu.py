"""GELU fused from its decomposed forms.

    0.5 * x * (1 + erf(x / sqrt 2))                              -> Gelu(x)
    0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))        -> Gelu(x, approximate="tanh")

The patterns are onnxscript's. The replacement is the standard ``Gelu`` where the model's opset is
20 or newer; below that it is ONNX Runtime's ``com.microsoft.Gelu`` / ``FastGelu``, which every ORT
target runs. ``standard_only=True`` skips models below opset 20 instead (for non-ORT targets).
"""

from __future__ import annotations

import functools

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions import erfgelu, gelu

from qcompile.passes.graph.rewrite import RuleSetPass

_ERF_PATTERNS = (gelu.GeluErfFusion().pattern, erfgelu.erf_gelu_pattern_1, erfgelu.erf_gelu_pattern_2)
_TANH_PATTERN = gelu.GeluTanhFusion().pattern


def _standard_erf(op, x):
    return op.Gelu(x, approximate="none")


def _standard_tanh(op, x):
    return op.Gelu(x, approximate="tanh")


def _ort_erf(op, x):
    return op.Gelu(x, _domain="com.microsoft")


def _ort_tanh(op, x):
    return op.FastGelu(x, _domain="com.microsoft")


@functools.cache
def _rules(standard: bool) -> pattern.RewriteRuleSet:
    """Built once per process: commuting the patterns takes ~70 ms, more than most model sweeps."""
    erf_replacement, tanh_replacement = (_standard_erf, _standard_tanh) if standard else (_ort_erf, _ort_tanh)
    rules = [pattern.RewriteRule(p, erf_replacement) for p in _ERF_PATTERNS]
    rules.append(pattern.RewriteRule(_TANH_PATTERN, tanh_replacement))
    return pattern.RewriteRuleSet(rules, commute=True)


class GeluFusionPass(RuleSetPass):
    """Fuse decomposed GELU; the replacement op depends on the model's opset."""

    def __init__(self, standard_only: bool = False) -> None:
        super().__init__("fuse-gelu", _rules(True), anchors=frozenset({"Erf", "Tanh"}))
        self._ort_rules = _rules(False)
        self._standard_rules = self.rules
        self.standard_only = standard_only

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if model.opset_imports.get("", 0) >= 20:
            self.rules = self._standard_rules
        elif self.standard_only:
            self.count = 0
            return ir.passes.PassResult(model, False)
        else:
            self.rules = self._ort_rules
        return super().call(model)


def fuse_gelu() -> ir.passes.PassBase:
    return GeluFusionPass()
