"""The high-precision stage (qcompile.precision): measured on data, whatever annotations the model carries."""

from __future__ import annotations

import numpy as np

from conftest import model_from_text
from qcompile.passes import make_pass
from qcompile.passmanager import PassManager
from qcompile.precision import has_low_precision, lower_precision


def test_untyped_intermediates_are_measured_and_an_fp16_overflow_stays_fp32():
    """After lowering, intermediate values carry no type (clear-shapes): a tensor that reaches 8e7 on the
    data must still be measured, so the nodes around it stay FP32 instead of overflowing to inf."""
    model = model_from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 4] x) => (float[2, 4] y) <float[4, 4] w = {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}, float big = {300.0}> {
      a = MatMul(x, w)
      b = Mul(a, big)
      c = Mul(b, b)
      d = Sqrt(c)
      e = Div(d, big)
      y = MatMul(e, w)
    }""")
    model = PassManager([make_pass("clear-shapes")])(model).model
    assert all(v.type is None for node in model.graph for v in node.outputs if not v.is_graph_output())
    feeds = [{"x": np.full((2, 4), 30.0, dtype=np.float32)}]
    lowered, report = lower_precision(model, "fp16", feeds)
    assert has_low_precision(lowered)
    measured = [name for name, reason in report.kept_fp32.items() if "measured" in reason or "absmax" in reason]
    assert measured, report.kept_fp32
    from qcompile import execute
    from qcompile.passes.quant.emulate import emulate_low_precision

    with execute.loaded(emulate_low_precision(lowered)) as runtime:
        y = runtime.run(feeds[0])["y"]
    assert np.all(np.isfinite(y)) and np.allclose(y, 30.0, rtol=1e-2)
