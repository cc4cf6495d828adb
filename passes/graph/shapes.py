"""Shape annotations: inferred for the passes, cleared before the model is handed on.

``shape-inference`` runs ONNX shape inference so that fusions can check ranks and broadcasts
(lenient: ops ONNX cannot infer keep the shapes they had). ``clear-shapes`` drops the type and
shape of every intermediate value (graph inputs, outputs and initializers keep theirs): runtimes
infer them again, and stale or extra annotations change what a runtime decides. Measured: ORT
1.32 on this AVX2 CPU fuses SkipLayerNormalization into MiniLM only when intermediate shapes are
annotated, and runs that 8% slower at batch 1, sequence 128 (docs/benchmarks.md).
"""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import _c_api_utils

log = logging.getLogger(__name__)


class ShapeInferencePass(ir.passes.InPlacePass):
    """Annotate values with inferred types and shapes; reports modified only if a shape changed.

    ONNX shape inference as onnx-ir's pass runs it, merged by :func:`_merge` rather than onnx-ir's
    merge, which sets only the element dtype and so turns an untyped ``seq(tensor(float))`` or
    ``optional(...)`` value into ``tensor(float)`` (ONNX Runtime then refuses the model)."""

    name = "shape-inference"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = _shape_signature(model)

        def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
            return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)

        try:
            inferred = _c_api_utils.call_onnx_api(infer, model)
        except Exception as exc:  # lenient, as onnx-ir's pass: a model ONNX cannot infer keeps its shapes
            log.info("shape inference failed, shapes left as they were: %s", exc)
            return ir.passes.PassResult(model, False)
        _merge(model, ir.serde.deserialize_model(inferred))
        return ir.passes.PassResult(model, _shape_signature(model) != before)


def _merge(model: ir.Model, inferred: ir.Model) -> None:
    """Take the inferred type and shape of every value, graph by graph (subgraphs included).

    A value's whole type is taken when it had none; a tensor's dtype when both are tensors; a type
    of another kind (a tensor inferred where a sequence was declared) is not merged at all."""
    for graph, inferred_graph in zip(model.graphs(), inferred.graphs()):
        found = ir.convenience.create_value_mapping(inferred_graph)
        for name, value in ir.convenience.create_value_mapping(graph).items():
            new = found.get(name)
            if new is None or new.type is None:
                continue
            if value.type is None:
                value.type = new.type
            elif value.type != new.type:
                if not (isinstance(value.type, ir.TensorType) and isinstance(new.type, ir.TensorType)):
                    continue
                value.type = new.type
            if new.shape is not None and value.shape != new.shape:
                value.shape = new.shape


def _shape_signature(model: ir.Model) -> tuple:
    return tuple(
        (v.name, str(v.shape), str(v.type))
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
