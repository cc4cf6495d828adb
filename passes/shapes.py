"""ONNX shape inference, so that fusions can check ranks and broadcast shapes.

Lenient: a model with ops ONNX cannot infer (custom domains) keeps the shapes it had.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common


class ShapeInferencePass(ir.passes.InPlacePass):
    """Annotate values with inferred types and shapes; reports modified only if a shape changed."""

    name = "shape-inference"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = _shape_signature(model)
        result = common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
        model = result.model
        return ir.passes.PassResult(model, _shape_signature(model) != before)


def _shape_signature(model: ir.Model) -> tuple:
    return tuple(
        (v.name, str(v.shape), str(v.dtype))
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        for v in node.outputs
    )


def shape_inference() -> ir.passes.PassBase:
    return ShapeInferencePass()
