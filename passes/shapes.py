"""Shape annotations: inferred for the passes, cleared before the model is handed on.

``shape-inference`` runs ONNX shape inference so that fusions can check ranks and broadcasts
(lenient: ops ONNX cannot infer keep the shapes they had). ``clear-shapes`` drops the type and
shape of every intermediate value (graph inputs, outputs and initializers keep theirs): runtimes
infer them again, and stale or extra annotations change what a runtime decides. Measured: ORT
1.32 on this AVX2 CPU fuses SkipLayerNormalization into MiniLM only when intermediate shapes are
annotated, and runs that 8% slower at batch 1, sequence 128 (docs/benchmarks.md).
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


class ClearShapesPass(ir.passes.InPlacePass):
    """Remove type/shape annotations from intermediate values (not graph inputs or outputs)."""

    name = "clear-shapes"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in (model.graph, *model.graph.subgraphs()):
            keep = {id(v) for v in (*graph.inputs, *graph.outputs, *graph.initializers.values())}
            for node in graph:
                for value in node.outputs:
                    if id(value) in keep or (value.shape is None and value.type is None):
                        continue
                    value.shape = None
                    value.type = None
                    modified = True
        return ir.passes.PassResult(model, modified)


def clear_shapes() -> ir.passes.PassBase:
    return ClearShapesPass()
