"""A named pass that applies an onnxscript rewrite-rule set once over the model.

Fixed points come from the PassManager (``steps``), not from looping here. ``anchors`` names op
types every rule's pattern contains at least one of: a model with none of them (subgraphs and
functions included) is skipped without matching.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import RewritePass, pattern


class RuleSetPass(RewritePass):
    """Apply ``rules`` to the model; ``count`` holds how many rewrites the last call made."""

    def __init__(self, name: str, rules: pattern.RewriteRuleSet | list[pattern.RewriteRule],
                 anchors: frozenset[str] | None = None) -> None:
        super().__init__(rules)
        self.name = name
        self.count = 0
        self.anchors = anchors

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.anchors is not None and not _has_op(model, self.anchors):
            self.count = 0
            return ir.passes.PassResult(model, False)
        self.count = self.rules.apply_to_model(model)
        if self.count:
            # Rewrites leave the replaced nodes' producers dangling; drop them here.
            ir.passes.common.RemoveUnusedNodesPass()(model)
            _sort_graphs(model)  # a replacement with several outputs can land before a reader of one
            allow_initializers(model)  # folded BatchNorm weights are new initializers
        return ir.passes.PassResult(model, bool(self.count))


def _sort_graphs(model: ir.Model) -> None:
    for graph in (model.graph, *model.graph.subgraphs()):
        graph.sort()


def _has_op(model: ir.Model, op_types: frozenset[str]) -> bool:
    graphs = (model.graph, *model.functions.values())
    return any(node.op_type in op_types for g in graphs for node in ir.traversal.RecursiveGraphIterator(g))


#: The first IR version whose initializers need not also be graph inputs.
IR_INITIALIZERS_OPTIONAL = 4


def allow_initializers(model: ir.Model) -> bool:
    """Raise an IR < 4 model to IR 4 where a pass left an initializer that is not a graph input.

    Up to IR 3 every initializer must also be a graph input (the checker rejects the model), and a
    pass cannot add inputs: that changes the model's interface, and an If/Loop/Scan body's inputs
    are positional. IR 4 only drops that rule (the opsets stay), and every runtime reads it."""
    if model.ir_version >= IR_INITIALIZERS_OPTIONAL:
        return False
    for graph in (model.graph, *model.graph.subgraphs()):
        inputs = set(map(id, graph.inputs))
        if any(id(v) not in inputs for v in graph.initializers.values()):
            model.ir_version = IR_INITIALIZERS_OPTIONAL
            return True
    return False
