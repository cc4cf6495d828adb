"""Constant folding: any node whose inputs are all constants is evaluated once and replaced by
its result (onnxscript's folder, with its size limits so weights are not duplicated).

``fold-weights`` (the quantization pipelines): the weights of Conv / ConvTranspose / MatMul / Gemm
that a constant subgraph computes — ``Cast(fp16 W)``, ``Transpose(W)``, ``ConstantOfShape`` —
folded whatever their size, so that the quantizer sees them as the constants they are. A weight
that comes out of a DequantizeLinear (an already quantized model) is left as it is: re-quantizing
its float values would quantize twice.

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


#: onnxscript's partial evaluators of these write Split / Unsqueeze with the inputs opset 13 gave them
#: (split, axes): below opset 13 the folded model fails the checker (the wheel's test_sequence_model5/8).
_OPSET_13_REWRITES = frozenset({"SplitToSequence", "ConcatFromSequence"})


class _Folder(_constant_folding.FoldConstantsPass):
    """onnxscript's folder; a node its evaluators raise on is kept unfolded instead of failing the pass,
    and the sequence rewrites that need opset 13 are not tried below it."""

    def process_node(self, node: ir.Node, is_function: bool):
        if (node.op_type in _OPSET_13_REWRITES and node.domain in ("", "ai.onnx")
                and self._opset_imports.get("", 13) < 13):
            return None
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


#: Ops whose weight (input 1) and bias (input 2) are what a quantizer reads.
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
#: A weight computed by these is already quantized, or cannot be folded: not traced through.
_NOT_THROUGH = frozenset({"DequantizeLinear", "QuantizeLinear", "If", "Loop", "Scan"})


def weight_cone(graph: ir.Graph) -> set[ir.Node]:
    """The nodes that compute a weighted op's weight or bias from constants alone (nothing upstream
    of an activation: an attention MatMul's key path or a mask stays to the default folder's limits)."""
    computable: dict[ir.Value, bool] = {}

    def from_constants(value: ir.Value) -> bool:
        """Whether ``value`` is computed from constants only, without a Q/DQ or control flow (iterative:
        an activation's ancestry is the whole network)."""
        stack = [value]
        while stack:
            top = stack[-1]
            if top in computable:
                stack.pop()
                continue
            producer = top.producer()
            if top.const_value is not None:
                computable[top] = True
            elif (producer is None or producer.op_type in _NOT_THROUGH or producer.graph is not graph
                  or top.is_graph_input()):
                computable[top] = False
            else:
                pending = [v for v in producer.inputs if v is not None and v not in computable]
                if pending:
                    stack.extend(pending)
                    continue
                computable[top] = all(computable[v] for v in producer.inputs if v is not None)
            stack.pop()
        return computable[value]

    cone: set[ir.Node] = set()
    stack = [v for node in graph if node.domain in ("", "ai.onnx") and node.op_type in WEIGHTED_OPS
             for v in node.inputs[1:3] if v is not None and v.const_value is None and from_constants(v)]
    while stack:
        producer = stack.pop().producer()
        if producer is None or producer in cone:
            continue
        cone.add(producer)
        stack.extend(v for v in producer.inputs if v is not None and v.const_value is None)
    return cone


class WeightFoldingPass(ir.passes.InPlacePass):
    """Fold the constant subgraphs that compute weights (module docstring), and nothing else."""

    name = "fold-weights"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cone = weight_cone(model.graph)
        if not cone:
            return ir.passes.PassResult(model, False)
        folder = _Folder(shape_inference=False, input_size_limit=2**62, output_size_limit=2**62,
                         should_fold=lambda node: node in cone)
        modified = bool(folder(model).modified)
        if modified:
            ir.passes.common.RemoveUnusedNodesPass()(model)
            allow_initializers(model)
        return ir.passes.PassResult(model, modified)


def fold_weights() -> ir.passes.PassBase:
    return WeightFoldingPass()
