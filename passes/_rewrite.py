"""A named pass that applies an onnxscript rewrite-rule set once over the model.

Fixed points come from the PassManager (``steps``), not from looping here.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import RewritePass, pattern


class RuleSetPass(RewritePass):
    """Apply ``rules`` to the model; ``count`` holds how many rewrites the last call made."""

    def __init__(self, name: str, rules: pattern.RewriteRuleSet | list[pattern.RewriteRule]) -> None:
        super().__init__(rules)
        self.name = name
        self.count = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.count = self.rules.apply_to_model(model)
        if self.count:
            # Rewrites leave the replaced nodes' producers dangling; drop them here.
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, bool(self.count))
