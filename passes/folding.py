"""Constant folding: any node whose inputs are all constants is evaluated once and replaced by
its result (onnxscript's folder, with its size limits so weights are not duplicated)."""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.optimizer import _constant_folding


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
        result = _constant_folding.fold_constants(
            model,
            onnx_shape_inference=False,
            input_size_limit=self.input_size_limit,
            output_size_limit=self.output_size_limit,
        )
        modified = bool(result.modified)
        if modified:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified)


def constant_folding() -> ir.passes.PassBase:
    return ConstantFoldingPass()
