"""Per-node INT8 sensitivity: the output SQNR of each quantized MatMul/Gemm on calibration data.

For node y = x W (+ b), with x captured on a few calibration feeds:

    SQNR = 10 log10( sum y^2 / sum (y - fq(x) fq(W) - b)^2 )      in dB

where fq is quantize-dequantize with the planned parameters. Nodes below the threshold stay float
(a per-layer error budget: 28 dB is about 4 % relative L2 error).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from qcompile.calibrate import tapped
from qcompile.passes._graph import weight_kn
from qcompile.passes.quant_math import QParams, fake_quantize, quantize_weight
from qcompile.passes.quant_policy import QuantPlan
from qcompile.runtimes import Runtime


def matmul_sqnr(
    model: ir.Model, plan: QuantPlan, qparams: Mapping[str, QParams], feeds: Iterable[dict[str, np.ndarray]],
    runtime: Runtime | None = None,
) -> dict[str, float]:
    """SQNR in dB of every planned MatMul/Gemm with a constant weight, over ``feeds``.

    ``runtime``: an open :func:`tapped` runtime that exposes the nodes' inputs (else one is opened).
    """
    nodes = [n for n in model.graph if n.name in set(plan.quantized_nodes) and n.op_type in ("MatMul", "Gemm")]
    nodes = [n for n in nodes if weight_kn(n) is not None and n.inputs[0].name in qparams]
    if not nodes:
        return {}
    weights = {}
    for n in nodes:
        w = weight_kn(n)
        spec = plan.weights[n.inputs[1].name]
        axis = spec.axis if spec.axis is None or n.op_type == "MatMul" else 1  # transposed Gemm: channels last
        _, wq = quantize_weight(w, axis)
        weights[n.name] = (w, fake_quantize(w, wq))
    names = sorted({n.inputs[0].name for n in nodes})
    signal, noise = defaultdict(float), defaultdict(float)
    with contextlib.ExitStack() as stack:
        if runtime is None:
            runtime = stack.enter_context(tapped(model, names))
        for feed in feeds:
            captured = runtime.run(feed, outputs=names)
            for n in nodes:
                x = captured[n.inputs[0].name].astype(np.float32)
                w, w_fq = weights[n.name]
                y = x @ w
                err = y - fake_quantize(x, qparams[n.inputs[0].name]) @ w_fq
                signal[n.name] += float(np.sum(y.astype(np.float64) ** 2))
                noise[n.name] += float(np.sum(err.astype(np.float64) ** 2))
    return {
        name: (math.inf if noise[name] == 0 else 10 * math.log10(signal[name] / noise[name]) if signal[name] > 0 else -math.inf)
        for name in signal
    }
