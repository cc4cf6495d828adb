"""Opset conversion as a pass: the default-domain opset raised (or lowered) to a target version.

Built on onnxscript's version converter (with its fallback to ONNX's C++ converter). Run it under the
PassManager with verification: a conversion that changes outputs, or fails, is rolled back, and the
caller decides what to do at the old opset (e.g. per-tensor Q/DQ below 13).
"""

from __future__ import annotations

import onnx_ir as ir


class OpsetConversionPass(ir.passes.InPlacePass):
    """Convert the default-domain opset to ``target`` (a no-op when it is already there)."""

    def __init__(self, target: int) -> None:
        super().__init__()
        self.target = target
        self.name = f"opset-{target}"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript import version_converter

        if model.opset_imports.get("", None) == self.target:
            return ir.passes.PassResult(model, False)
        version_converter.convert_version(model, target_version=self.target, fallback=True)
        model.opset_imports[""] = self.target
        return ir.passes.PassResult(model, True)
