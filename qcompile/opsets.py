"""What each construct qcompile writes needs of the model's opset, and raising the opset, verified.

    QuantizeLinear / DequantizeLinear, per tensor      opset 10
    per-channel Q/DQ (the ``axis`` attribute)          opset 13
    FP8 Q/DQ, and FP16/BF16 Q/DQ scales                opset 19
    INT4 and blocked Q/DQ (``block_size``)             opset 21

A model below what a lowering needs is converted (onnxscript's version converter) under the
PassManager with verification on the float model's own verification feeds; a conversion that fails or
changes outputs is rolled back, and the caller falls back (e.g. per-tensor Q/DQ) and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from qcompile.passes.graph.opset import OpsetConversionPass
from qcompile.passmanager import PassManager, VerifyOptions

QDQ_PER_TENSOR = 10
QDQ_PER_CHANNEL = 13
QDQ_FP8 = 19
QDQ_BLOCKED = 21


def opset_of(model: ir.Model) -> int:
    return int(model.opset_imports.get("", 1))


@dataclass(frozen=True)
class OpsetChange:
    """The opset before and after, and why (``upgraded``, ``kept``, or ``failed``: reason)."""

    before: int
    after: int
    action: str
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.action in ("kept", "upgraded")

    def to_json(self) -> dict:
        return {"before": self.before, "after": self.after, "action": self.action, "reason": self.reason}


def ensure_opset(model: ir.Model, minimum: int, feeds: list[dict] | None, why: str) -> tuple[ir.Model, OpsetChange]:
    """``model`` at opset ``minimum`` or above, and what was done.

    Verified on ``feeds`` (None: no verification). On failure the model as it was is returned and
    the change says why."""
    before = opset_of(model)
    if before >= minimum:
        return model, OpsetChange(before, before, "kept")
    manager = PassManager([OpsetConversionPass(minimum)], verify=feeds is not None, rollback=True,
                          verify_options=VerifyOptions(feeds=feeds))
    result = manager(model)
    if result.rolled_back:
        return result.model, OpsetChange(before, before, "failed", f"{why}: {result.rolled_back[0].error}")
    return result.model, OpsetChange(before, minimum, "upgraded", why)
