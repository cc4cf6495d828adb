"""Constant folding: any node whose inputs are all constants is evaluated once and replaced by
its result (onnxscript's folder, with its size limits so weights are not duplicated).

A node that one of onnxscript's partial evaluators fails on is left as it is (folding is only an
optimization), e.g. onnxscript 0.7's SplitToSequence evaluator on a scalar ``split`` whose value is
unknown (``split_value.ndim`` on None).
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnxscript.optimizer import _constant_folding

from qcompile.passes.graph.rewrite import allow_initializers

log = logging.getLogger(__name__)


class _Folder(_constant_folding.FoldConstantsPass):
    """onnxscript's folder; a node its evaluators raise on is kept unfolded instead of failing the pass."""

    def process_node(self, node: ir.Node, is_function: bool):
        try:
            return super().process_node(node, is_function)
        except RuntimeError as exc:
            # The folder wraps an evaluator's exception in this RuntimeError; anything else is ours.
            if exc.__cause__ is None or not str(exc).startswith("Error during constant folding"):
                raise
            log.info("not folding %s: %s: %s", node.op_type, type(exc.__cause__).__name__, exc.__cause__)
            return None


class ConstantFoldingPass(ir.passes.InPlacePass):
    """Fold constant subgraphs, including shape computations made static by known shapes."""

    name = "constant-folding"

    def __init__(
        self,
        input_size_limit: int = _constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
        output_size_limit: int = _constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
    ) -> None:
        super().__init__()
        self.input_size_limit = input_size_limit
        self.output_size_limit = output_size_limit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folder = _Folder(
            shape_inference=False, input_size_limit=self.input_size_limit, output_size_limit=self.output_size_limit
        )
        result = folder(model)
        modified = bool(result.modified)
        if modified:
            ir.passes.common.RemoveUnusedNodesPass()(model)
            allow_initializers(model)  # folded values are new initializers
        return ir.passes.PassResult(model, modified)


def constant_folding() -> ir.passes.PassBase:
    return ConstantFoldingPass()
