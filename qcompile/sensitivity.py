"""Per-node INT8 sensitivity: the output SQNR of each quantized MatMul/Gemm on calibration data.

For node y = x W (+ b), with x captured on a few calibration feeds:

    SQNR = 10 log10( sum y^2 / sum (y - fq(x) fq(W) - b)^2 )      in dB

where fq is quantize-dequantize with the planned parameters. Nodes below the threshold stay float
(a per-layer error budget: 28 dB is about 4 % relative L2 error).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Mapping

import numpy as np
import onnx_ir as ir

from qcompile.passes._graph import drop_resident, weight_kn
from qcompile.passes.quant_math import QParams, fake_quantize, quantize_weight
from qcompile.passes.quant_policy import QuantPlan


#: Multiply-adds spent on the estimate, over all nodes: rows beyond it are subsampled evenly.
DEFAULT_MAX_MACS = 10_000_000_000


class SensitivitySampler:
    """Measures each planned MatMul/Gemm's INT8 output SQNR from rows kept during calibration.

    Pass it as :func:`~qcompile.calibrate.collect_ranges`'s ``on_outputs``: it keeps evenly spaced
    token rows of the nodes' inputs from the first ``feeds`` feeds (at most ``max_macs``
    multiply-adds' worth over all nodes), so no feed is run twice. :meth:`sqnr` then handles one
    node at a time (memory: one weight's copy) and unmaps each memory-mapped weight after use;
    the MatMul weights' int8 codes stay in :attr:`codes` for the lowering to reuse.
    """

    def __init__(self, model: ir.Model, plan: QuantPlan, feeds: int = 4, max_macs: int = DEFAULT_MAX_MACS) -> None:
        observed, quantized = set(plan.activations), set(plan.quantized_nodes)
        self.nodes = [
            n for n in model.graph
            if n.name in quantized and n.op_type in ("MatMul", "Gemm") and weight_kn(n) is not None
            and n.inputs[0].name in observed
        ]
        self.plan = plan
        self.feeds = feeds
        macs_per_row = sum(int(np.prod(n.inputs[1].const_value.shape.numpy())) for n in self.nodes) or 1
        self.rows_per_feed = max(1, math.ceil(max_macs / macs_per_row / max(feeds, 1)))
        self.names = sorted({n.inputs[0].name for n in self.nodes})
        self._rows: dict[str, list[np.ndarray]] = defaultdict(list)
        self._seen = 0
        self.codes: dict[str, tuple[np.ndarray, QParams]] = {}

    def __call__(self, outputs: Mapping[str, np.ndarray]) -> None:
        if self._seen >= self.feeds:
            return
        self._seen += 1
        for name in self.names:
            self._rows[name].append(_even_rows(outputs[name], self.rows_per_feed))

    def sqnr(self, qparams: Mapping[str, QParams]) -> dict[str, float]:
        """SQNR in dB per node name, with activation parameters ``qparams``."""
        if not self._seen:
            return {}
        inputs = {name: np.concatenate(parts) for name, parts in self._rows.items()}
        result = {}
        for node in self.nodes:
            x_params = qparams.get(node.inputs[0].name)
            if x_params is None:
                continue
            result[node.name], codes = _node_sqnr(node, inputs[node.inputs[0].name], x_params, self.plan)
            if node.op_type == "MatMul":  # codes in the stored layout
                self.codes[node.inputs[1].name] = codes
            drop_resident(node.inputs[1].const_value)
        return result


def _even_rows(x: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` evenly spaced rows of x seen as [rows, channels]."""
    rows = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    if len(rows) <= limit:
        return rows.copy()
    return rows[np.linspace(0, len(rows) - 1, limit).round().astype(np.int64)]


def _node_sqnr(
    node: ir.Node, x: np.ndarray, x_params: QParams, plan: QuantPlan
) -> tuple[float, tuple[np.ndarray, QParams]]:
    """y = x W against fq(x) fq(W), with fq(W) applied as int8 codes times per-channel scales;
    returns the SQNR in dB and the weight's (codes, parameters)."""
    w = weight_kn(node)
    spec = plan.weights[node.inputs[1].name]
    axis = spec.axis if spec.axis is None or node.op_type == "MatMul" else 1  # transposed Gemm: channels last
    codes, wq = quantize_weight(w, axis)
    x_fq = fake_quantize(x, x_params)
    scale = np.asarray(wq.scale, dtype=np.float32)
    if wq.axis == 0:  # per input channel: scale the rows of x instead
        y_q = (x_fq * scale[None, :]) @ codes.astype(np.float32)
    else:
        y_q = (x_fq @ codes.astype(np.float32)) * scale
    y = x @ w
    signal = float(np.sum(np.square(y, dtype=np.float64)))
    noise = float(np.sum(np.square(y - y_q, dtype=np.float64)))
    if noise == 0:
        return math.inf, (codes, wq)
    return (10 * math.log10(signal / noise) if signal > 0 else -math.inf), (codes, wq)
