"""The smooth stage: SmoothQuant scales from calibration data, folded into the FP32 model.

Per smoothable activation X (passes/quant/smooth_fold.py finds the groups) one calibration loop
observes max|X_j| per channel and, for alpha "auto", samples rows of the first feeds; the scales and
the alpha search are qcompile.quant.algorithms.smoothquant; the fold is verified FP32-equivalent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import onnx_ir as ir

from qcompile.calibrate import collect
from qcompile.calibration import IterableReader
from qcompile.passes.irutil import weight_kn
from qcompile.passes.quant.smooth_fold import SmoothGroup, SmoothQuantPass, find_groups, weight_row_absmax
from qcompile.passmanager import PassManager, VerifyOptions
from qcompile.quant.algorithms.smoothquant import ALPHA_GRID, search_alpha, smoothing_scales
from qcompile.quant.observers import Method
from qcompile.quant.statistics import ChannelAbsMax, RowSample

Alpha = float | Literal["auto"]
#: Calibration feeds whose rows the alpha search scores each alpha on.
SEARCH_FEEDS = 4


@dataclass
class SmoothingResult:
    model: ir.Model
    alphas: dict[str, float] = field(default_factory=dict)
    groups: int = 0
    #: the activations divided by their smoothing scales (their values changed, names kept)
    scaled: frozenset[str] = frozenset()

    def to_json(self) -> dict:
        return {"groups": self.groups, "alphas": {k: round(v, 2) for k, v in self.alphas.items()}}


def smooth(
    model: ir.Model, feeds: Sequence[dict[str, np.ndarray]], alpha: Alpha = 0.5, *, verify: bool = True,
    method: Method = "mse", activation_dtype: str = "uint8", symmetric: bool = False,
) -> SmoothingResult:
    """Apply SmoothQuant to every smoothable activation of ``model`` (in place); FP32-equivalent.

    ``method``, ``activation_dtype`` and ``symmetric``: how the activations will be calibrated and
    quantized afterwards (the alpha search scores each alpha under them).
    """
    groups = find_groups(model)
    if not groups:
        return SmoothingResult(model)
    absmax = {g.activation: ChannelAbsMax() for g in groups}
    rows = {g.activation: RowSample(SEARCH_FEEDS) for g in groups} if alpha == "auto" else {}
    statistics = {name: [stat, *([rows[name]] if name in rows else [])] for name, stat in absmax.items()}
    collect(model, statistics, IterableReader(feeds), label="smoothing statistics of")
    nodes = {n.name: n for n in model.graph}
    scales, alphas = {}, {}
    for group in groups:
        act_max = absmax[group.activation].absmax()
        w_max = weight_row_absmax(model, group)
        if alpha == "auto":
            x = rows[group.activation].rows().astype(np.float32)
            ws = [weight_kn(nodes[c]).astype(np.float32) for c in group.consumers]
            chosen = search_alpha(x, ws, act_max, w_max, method, activation_dtype, symmetric)
        else:
            chosen = float(alpha)
        alphas[group.activation] = chosen
        scales[group.activation] = smoothing_scales(act_max, w_max, chosen)
    manager = PassManager([SmoothQuantPass(groups, scales)], verify=verify,
                          verify_options=VerifyOptions(feeds=list(feeds[:2]) or None))
    return SmoothingResult(manager(model).model, alphas, len(groups), frozenset(scales))


__all__ = ["ALPHA_GRID", "SmoothGroup", "SmoothingResult", "smooth"]
