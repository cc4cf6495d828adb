"""Per-node INT8 sensitivity measured on calibration data (the maths: qcompile.quant.algorithms.sensitivity).

The token rows of each planned MatMul/Gemm input are sampled by the one calibration loop
(a :class:`~qcompile.quant.statistics.RowSample` per input, fed with the ranges); nodes whose INT8
output SQNR falls below the guard stay float (a per-layer error budget: 28 dB ~ 4 % relative L2).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx_ir as ir

from qcompile.passes.irutil import drop_resident, weight_kn
from qcompile.quant.algorithms.sensitivity import output_sqnr
from qcompile.quant.spec import QParams
from qcompile.quant.statistics import RowSample

#: Multiply-adds spent on the estimate over all nodes: beyond it, evenly spaced output columns are used
#: (every token row is kept, so rare outlier tokens still count).
DEFAULT_MAX_MACS = 10_000_000_000
#: Memory for the kept rows: beyond it, evenly spaced rows of each feed are kept.
MAX_ROW_BYTES = 256 * 1024 * 1024


class SensitivitySampler:
    """Measures each planned MatMul/Gemm's INT8 output SQNR from rows kept during calibration.

    :meth:`statistics` gives the row samples to feed in the calibration loop (the first ``feeds``
    feeds, at most ``MAX_ROW_BYTES`` or ``row_bytes``), so no feed is run twice. :meth:`sqnr` then
    handles one node at a time (memory: one weight's copy), on evenly spaced output columns when all
    of them would cost more than ``max_macs`` multiply-adds, and unmaps each memory-mapped weight
    after use; the MatMul weights' int8 codes stay in :attr:`codes` for the lowering to reuse.
    """

    def __init__(self, model: ir.Model, nodes: list[ir.Node], weight_axes: Mapping[str, int | None], feeds: int = 4,
                 max_macs: int = DEFAULT_MAX_MACS, row_bytes: int | None = None) -> None:
        self.nodes = [n for n in nodes if n.op_type in ("MatMul", "Gemm") and weight_kn(n) is not None]
        self.weight_axes = weight_axes
        self.feeds = feeds
        self.max_macs = max_macs
        names = sorted({n.inputs[0].name for n in self.nodes})
        per_row = 4 * sum(weight_kn(n).shape[0] for n in {n.inputs[0].name: n for n in self.nodes}.values()) or 1
        self.rows_per_feed = max(1, MAX_ROW_BYTES // per_row // max(feeds, 1))
        if row_bytes is not None and row_bytes < MAX_ROW_BYTES:
            rows = max(1, self.rows_per_feed * row_bytes // MAX_ROW_BYTES)
            # fewer rows: the same share of output columns (its multiply-add budget scales with them)
            self.max_macs = max(1, self.max_macs * rows // self.rows_per_feed)
            self.rows_per_feed = rows
        self.samples = {name: RowSample(feeds, self.rows_per_feed) for name in names}
        self.codes: dict[str, tuple[np.ndarray, QParams]] = {}

    def statistics(self) -> dict[str, list[RowSample]]:
        return {name: [sample] for name, sample in self.samples.items()}

    def sqnr(self, qparams: Mapping[str, QParams]) -> dict[str, float]:
        """SQNR in dB per node name, with activation parameters ``qparams``."""
        if not self.samples or not all(s.parts for s in self.samples.values()):
            return {}  # no feed, or no MatMul/Gemm to measure (an LSTM-only model)
        inputs = {name: sample.rows() for name, sample in self.samples.items()}
        rows = len(next(iter(inputs.values())))
        total_macs = rows * sum(int(np.prod(n.inputs[1].const_value.shape.numpy())) for n in self.nodes)
        fraction = min(1.0, self.max_macs / max(total_macs, 1))
        result = {}
        for node in self.nodes:
            x_params = qparams.get(node.inputs[0].name)
            if x_params is None:
                continue
            axis = self.weight_axes[node.inputs[1].name]
            axis = axis if axis is None or node.op_type == "MatMul" else 1  # transposed Gemm: channels last
            result[node.name], codes = output_sqnr(inputs[node.inputs[0].name], weight_kn(node), x_params, axis,
                                                   fraction)
            if node.op_type == "MatMul":  # codes in the stored layout
                self.codes[node.inputs[1].name] = codes
            drop_resident(node.inputs[1].const_value)
        return result
