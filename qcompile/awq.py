"""The AWQ stage for weight-only recipes: statistics from one calibration loop, scales folded into
the FP32 model (verified equivalent), then every candidate's block codes with searched clipping.

The maths (scales, the alpha search, the clipping weights) is qcompile.quant.algorithms.awq. Groups
are the foldable ones of passes/quant/smooth_fold.py (a LayerNormalization or a Mul by a constant
vector absorbs 1/s); groups whose producer cannot absorb it (attention outputs, SiLU(gate) * up) are
left unscaled rather than paying an extra Mul per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx_ir as ir

from qcompile.calibrate import collect
from qcompile.calibration import IterableReader
from qcompile.passes.irutil import weight_kn
from qcompile.passes.quant.nbits import WeightOnlyConfig, candidates
from qcompile.passes.quant.smooth_fold import SmoothQuantPass, find_groups
from qcompile.passmanager import PassManager, VerifyOptions
from qcompile.progress import bar
from qcompile.quant.algorithms.awq import ALPHA_GRID, awq_scales, clipping_importance, search_alpha
from qcompile.quant.algorithms.rtn import rtn
from qcompile.quant.spec import BlockCodes
from qcompile.quant.statistics import ChannelMoments, RowSample

#: Calibration feeds whose rows the alpha search scores each alpha on.
SEARCH_FEEDS = 4


@dataclass
class AwqResult:
    model: ir.Model
    alphas: dict[str, float] = field(default_factory=dict)
    groups: int = 0
    codes: dict[str, BlockCodes] = field(default_factory=dict)  # per weight name, for the lowering

    def to_json(self) -> dict:
        return {"groups": self.groups, "alphas": {k: round(v, 3) for k, v in self.alphas.items()}}


def awq(model: ir.Model, feeds: Sequence[dict[str, np.ndarray]], config: WeightOnlyConfig) -> AwqResult:
    """Scale ``model``'s weight-only candidates AWQ-style (in place; FP32-equivalent, verified) and
    quantize them with searched block ranges; the codes come back per weight name."""
    groups = find_groups(model)  # names the nodes first
    nodes_to_quantize = candidates(model, config)
    eligible = {n.name for n in nodes_to_quantize}
    groups = [g for g in groups if g.fold and g.consumers and all(c in eligible for c in g.consumers)]
    if not nodes_to_quantize:
        return AwqResult(model)
    searched = {g.activation for g in groups}
    names = sorted({n.inputs[0].name for n in nodes_to_quantize})
    moments = {name: ChannelMoments() for name in names}
    rows = {name: RowSample(SEARCH_FEEDS) for name in names if name in searched}
    collect(model, {name: [moments[name], *([rows[name]] if name in rows else [])] for name in names},
            IterableReader(feeds), label="AWQ statistics of")
    nodes = {n.name: n for n in model.graph}
    scales, alphas = {}, {}
    with bar("AWQ scale search", total=len(groups)) as advance:
        for group in groups:
            x = rows[group.activation].rows().astype(np.float32)
            mean_abs = moments[group.activation].mean_abs()
            weights = [weight_kn(nodes[c]).astype(np.float32) for c in group.consumers]
            best = search_alpha(x, weights, mean_abs, config.bits, config.block_size, config.symmetric)
            alphas[group.activation] = best
            if best > 0:
                scales[group.activation] = awq_scales(mean_abs, best)
            advance()
    scaled = [g for g in groups if g.activation in scales]
    manager = PassManager([SmoothQuantPass(scaled, scales)], verify=True,
                          verify_options=VerifyOptions(feeds=list(feeds[:2]) or None))
    model = manager(model).model
    codes = {}
    with bar("AWQ clipping search", total=len(nodes_to_quantize)) as advance:
        for node in nodes_to_quantize:
            name = node.inputs[0].name
            s = scales.get(name)
            importance = clipping_importance(moments[name].mean_square(), s)
            w = node.inputs[1].const_value.numpy()
            codes[node.inputs[1].name] = rtn(w, config.bits_for(node), config.block_for(node), config.symmetric,
                                               importance)
            advance()
    return AwqResult(model, alphas, len(groups), codes)


__all__ = ["ALPHA_GRID", "AwqResult", "awq"]
