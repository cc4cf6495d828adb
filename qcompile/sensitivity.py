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
from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qcompile.calibrate import tapped
from qcompile.passes._graph import weight_kn
from qcompile.passes.quant_math import QParams, fake_quantize, quantize_weight
from qcompile.passes.quant_policy import QuantPlan
from qcompile.runtimes import Runtime


#: Multiply-adds spent on the estimate, over all nodes: rows beyond it are subsampled evenly.
DEFAULT_MAX_MACS = 25_000_000_000


def matmul_sqnr(
    model: ir.Model, plan: QuantPlan, qparams: Mapping[str, QParams], feeds: Sequence[dict[str, np.ndarray]],
    runtime: Runtime | None = None, max_macs: int = DEFAULT_MAX_MACS,
) -> dict[str, float]:
    """SQNR in dB of every planned MatMul/Gemm with a constant weight, over ``feeds``.

    Each node sees the same token rows; when all rows of all feeds would cost more than
    ``max_macs`` multiply-adds, evenly spaced rows of each feed are used. Weights are fake-quantized
    one node at a time (memory: one weight's copy). ``runtime``: an open :func:`tapped` runtime
    that exposes the nodes' inputs (else one is opened).
    """
    nodes = [n for n in model.graph if n.name in set(plan.quantized_nodes) and n.op_type in ("MatMul", "Gemm")]
    nodes = [n for n in nodes if weight_kn(n) is not None and n.inputs[0].name in qparams]
    if not nodes or not feeds:
        return {}
    macs_per_row = sum(int(np.prod(n.inputs[1].const_value.shape.numpy())) for n in nodes)
    rows_per_feed = max(1, math.ceil(max_macs / macs_per_row / len(feeds)))
    names = sorted({n.inputs[0].name for n in nodes})
    captured: dict[str, list[np.ndarray]] = defaultdict(list)
    with contextlib.ExitStack() as stack:
        if runtime is None:
            runtime = stack.enter_context(tapped(model, names))
        for feed in feeds:
            for name, x in runtime.run(feed, outputs=names).items():
                captured[name].append(_even_rows(x, rows_per_feed))
    inputs = {name: np.concatenate(parts) for name, parts in captured.items()}
    return {n.name: _node_sqnr(n, inputs[n.inputs[0].name], qparams[n.inputs[0].name], plan) for n in nodes}


def _even_rows(x: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` evenly spaced rows of x seen as [rows, channels]."""
    rows = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    if len(rows) <= limit:
        return rows
    return rows[np.linspace(0, len(rows) - 1, limit).round().astype(np.int64)]


def _node_sqnr(node: ir.Node, x: np.ndarray, x_params: QParams, plan: QuantPlan) -> float:
    w = weight_kn(node)
    spec = plan.weights[node.inputs[1].name]
    axis = spec.axis if spec.axis is None or node.op_type == "MatMul" else 1  # transposed Gemm: channels last
    _, wq = quantize_weight(w, axis)
    y = x @ w
    err = y - fake_quantize(x, x_params) @ fake_quantize(w, wq)
    signal = float(np.sum(y.astype(np.float64) ** 2))
    noise = float(np.sum(err.astype(np.float64) ** 2))
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf
