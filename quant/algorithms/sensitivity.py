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

from qcompile.passes.irutil import drop_resident, weight_kn
from qcompile.quant.qparams import QParams, fake_quantize, quantize_weight
from qcompile.passes.quant.annotate import QuantPlan
from qcompile.quant.observers import finite_rows


#: Multiply-adds spent on the estimate over all nodes: beyond it, evenly spaced output columns are used
#: (every token row is kept, so rare outlier tokens still count).
DEFAULT_MAX_MACS = 10_000_000_000
#: Memory for the kept rows: beyond it, evenly spaced rows of each feed are kept.
MAX_ROW_BYTES = 256 * 1024 * 1024


class SensitivitySampler:
    """Measures each planned MatMul/Gemm's INT8 output SQNR from rows kept during calibration.

    Pass it as :func:`~qcompile.calibrate.collect_ranges`'s ``on_outputs``: it keeps the token rows
    of the nodes' inputs from the first ``feeds`` feeds (at most ``MAX_ROW_BYTES``), so no
    feed is run twice. :meth:`sqnr` then handles one node at a time (memory: one weight's copy),
    on evenly spaced output columns when all of them would cost more than ``max_macs``
    multiply-adds, and unmaps each memory-mapped weight after use; the MatMul weights' int8 codes
    stay in :attr:`codes` for the lowering to reuse.
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
        self.max_macs = max_macs
        self.names = sorted({n.inputs[0].name for n in self.nodes})
        row_bytes = 4 * sum(weight_kn(n).shape[0] for n in {n.inputs[0].name: n for n in self.nodes}.values()) or 1
        self.rows_per_feed = max(1, MAX_ROW_BYTES // row_bytes // max(feeds, 1))
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
        if not self._seen or not self._rows:  # no feed, or no MatMul/Gemm to measure (an LSTM-only model)
            return {}
        for name, parts in self._rows.items():  # joined in place: the per-feed parts are freed
            self._rows[name] = [np.concatenate(parts)] if len(parts) > 1 else parts
        inputs = {name: parts[0] for name, parts in self._rows.items()}
        rows = len(next(iter(inputs.values())))
        total_macs = rows * sum(int(np.prod(n.inputs[1].const_value.shape.numpy())) for n in self.nodes)
        fraction = min(1.0, self.max_macs / max(total_macs, 1))
        result = {}
        for node in self.nodes:
            x_params = qparams.get(node.inputs[0].name)
            if x_params is None:
                continue
            result[node.name], codes = _node_sqnr(node, inputs[node.inputs[0].name], x_params, self.plan, fraction)
            if node.op_type == "MatMul":  # codes in the stored layout
                self.codes[node.inputs[1].name] = codes
            drop_resident(node.inputs[1].const_value)
        return result


def _even_rows(x: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` evenly spaced rows of x seen as [rows, channels] (a float32 copy)."""
    rows = finite_rows(x)
    if len(rows) > limit:
        rows = rows[np.linspace(0, len(rows) - 1, limit).round().astype(np.int64)]
    return rows.astype(np.float32)


def _node_sqnr(
    node: ir.Node, x: np.ndarray, x_params: QParams, plan: QuantPlan, fraction: float = 1.0
) -> tuple[float, tuple[np.ndarray, QParams]]:
    """y = x W against fq(x) fq(W) on ``fraction`` of the output columns (evenly spaced), with
    fq(W) applied as int8 codes times per-channel scales; returns the SQNR in dB and the weight's
    (codes, parameters) for all columns."""
    w = weight_kn(node)
    spec = plan.weights[node.inputs[1].name]
    axis = spec.axis if spec.axis is None or node.op_type == "MatMul" else 1  # transposed Gemm: channels last
    codes, wq = quantize_weight(w, axis)
    n = w.shape[1]
    cols = np.unique(np.linspace(0, n - 1, max(1, math.ceil(fraction * n))).round().astype(np.int64))
    x_fq = fake_quantize(x, x_params)
    scale = np.asarray(wq.scale, dtype=np.float32)
    codes_f = codes[:, cols].astype(np.float32)
    if wq.axis == 0:  # per input channel: scale the rows of x instead
        y_q = (x_fq * scale[None, :]) @ codes_f
    else:
        y_q = (x_fq @ codes_f) * (scale[cols] if scale.ndim else scale)
    y = x @ w[:, cols]
    signal = float(np.sum(np.square(y, dtype=np.float64)))
    noise = float(np.sum(np.square(y - y_q, dtype=np.float64)))
    if noise == 0:
        return math.inf, (codes, wq)
    return (10 * math.log10(signal / noise) if signal > 0 else -math.inf), (codes, wq)
