"""The high-precision stage: what is not quantized runs in FP16 or BF16 (GPU targets), FP32 kept where
the range demands it (passes/quant/mixed_precision.py), measured on data.

    measure   max |x| of every float tensor of the model to convert, on the verification feeds (the
              first calibration samples when the user gave data): a tensor beyond FP16's range keeps
              its producer and consumers FP32
    convert   the mixed-precision pass: FP16/BF16 tensors and initializers, Casts only where FP32 and
              low precision meet, graph inputs and outputs FP32 under their names
    check     the caller's end-to-end check runs the result on ONNX Runtime CPU with its FP16/BF16
              parts emulated (passes/quant/emulate.py: values rounded where the model stores them,
              arithmetic in FP32 — TensorRT's FP16-storage / FP32-accumulate, not bit-exact)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import onnx_ir as ir

from qcompile.calibrate import collect
from qcompile.calibration import IterableReader
from qcompile.passes.quant.annotate import excluded
from qcompile.passmanager import PassManager
from qcompile.quant.statistics import AbsMax
from qcompile.targets import FLOAT_TYPES

LOW_TYPES = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


@dataclass
class PrecisionReport:
    """What the mixed-precision pass did: the element type, nodes converted, nodes kept FP32 and why."""

    high_precision: str
    converted: list[str] = field(default_factory=list)
    kept_fp32: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"high_precision": self.high_precision, "converted_nodes": len(self.converted),
                "kept_fp32": dict(self.kept_fp32)}


def has_low_precision(model: ir.Model) -> bool:
    """Whether any tensor of the main graph is FP16 or BF16 (ORT CPU then runs an emulated copy)."""
    graph = model.graph
    values = [*graph.inputs, *graph.initializers.values(), *(v for node in graph for v in node.outputs)]
    return any(v.dtype in LOW_TYPES for v in values)


def float_absmax(model: ir.Model, feeds: list[dict]) -> dict[str, float]:
    """max |x| of every float node output of the main graph over ``feeds`` (one tapped session)."""
    names = [v.name for node in model.graph for v in node.outputs
             if v.name and v.dtype == ir.DataType.FLOAT and v.const_value is None and node.op_type != "Constant"]
    statistics = {name: AbsMax() for name in dict.fromkeys(names)}
    if not feeds or not statistics:
        return {}
    collect(model, {name: [s] for name, s in statistics.items()}, IterableReader(feeds, "the verification feeds",
                                                                                 user_code=False),
            label="measuring FP16 range of")
    return {name: s.value for name, s in statistics.items()}


def lower_precision(model: ir.Model, high_precision: str, feeds: list[dict],
                    exclude: Iterable[str] = ()) -> tuple[ir.Model, PrecisionReport | None]:
    """``model`` with its unquantized part in ``high_precision`` (fp32: unchanged, no report).
    ``exclude``: node names, op types or patterns kept FP32 (the recipe's exclusions)."""
    if high_precision == "fp32":
        return model, None
    from qcompile.passes import make_pass
    from qcompile.passes.quant.mixed_precision import MixedPrecisionPass

    patterns = frozenset(exclude)
    keep = frozenset(node.name for node in model.graph if patterns and excluded(node, patterns))
    # types first (a lowered model's intermediate values carry none): every float tensor is measured
    model = PassManager([make_pass("shape-inference")])(model).model
    absmax = float_absmax(model, feeds) if high_precision == "fp16" else None
    mixed = MixedPrecisionPass(FLOAT_TYPES[high_precision], keep_fp32=keep, absmax=absmax)
    model = PassManager([mixed, make_pass("clear-shapes")])(model).model
    return model, PrecisionReport(high_precision, list(mixed.converted), dict(mixed.kept_fp32))
