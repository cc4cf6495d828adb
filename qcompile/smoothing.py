"""SmoothQuant driven by calibration data: statistics, alpha search, then the folding pass.

Per smoothable activation X (passes/smoothquant.py finds them) the per-channel max|X_j| is
observed over the calibration feeds. alpha is global, or "auto": per group, the alpha in
{0.3, 0.4, ..., 0.8} that minimises the group's INT8 output error on the first feeds,

    sum_i || X W_i - fq(X / s) fq(diag(s) W_i) ||^2

with fq the target's quantization (per-tensor activations over the range the calibration method
would pick for X / s, per-channel s8 weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import onnx_ir as ir

from qcompile.calibrate import tapped
from qcompile.quant.observers import Method, MinMaxObserver, finite_rows, make_observer
from qcompile.passes.irutil import weight_kn
from qcompile.quant.qparams import activation_qparams, fake_quantize, quantize_weight
from qcompile.passes.quant.smooth_fold import SmoothGroup, SmoothQuantPass, find_groups, smoothing_scales, weight_row_absmax
from qcompile.passmanager import PassManager, VerifyOptions

Alpha = float | Literal["auto"]
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
SEARCH_FEEDS = 4


@dataclass
class SmoothingResult:
    model: ir.Model
    alphas: dict[str, float] = field(default_factory=dict)
    groups: int = 0

    def to_json(self) -> dict:
        return {"groups": self.groups, "alphas": {k: round(v, 2) for k, v in self.alphas.items()}}


def _group_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray, method: Method, dtype: str,
                 symmetric: bool) -> float:
    xs = x / s
    observer = make_observer(method, symmetric=symmetric)
    observer.update(xs)
    lo, hi = observer.range()
    qp = activation_qparams(float(lo), float(hi), dtype, symmetric)
    xq = fake_quantize(xs, qp)
    err = 0.0
    for w in weights:
        ws = w * s[:, None]
        _, wqp = quantize_weight(ws, axis=1)
        err += float(np.sum((x @ w - xq @ fake_quantize(ws, wqp)) ** 2))
    return err


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
    names = [g.activation for g in groups]
    observers = {name: MinMaxObserver(axis=-1) for name in names}
    samples: dict[str, list[np.ndarray]] = {name: [] for name in names}
    with tapped(model, names) as runtime:
        for i, feed in enumerate(feeds):
            arrays = runtime.run(feed, outputs=names)
            for name in names:
                observers[name].update(arrays[name])
                if alpha == "auto" and i < SEARCH_FEEDS:
                    samples[name].append(finite_rows(arrays[name]))
    nodes = {n.name: n for n in model.graph}
    scales, alphas = {}, {}
    for group in groups:
        lo, hi = observers[group.activation].range()
        act_max = np.maximum(np.abs(lo), np.abs(hi))
        w_max = weight_row_absmax(model, group)
        if alpha == "auto":
            x = np.concatenate(samples[group.activation]).astype(np.float32)
            ws = [weight_kn(nodes[c]).astype(np.float32) for c in group.consumers]
            errors = {a: _group_error(x, ws, smoothing_scales(act_max, w_max, a), method,
                                    activation_dtype, symmetric) for a in ALPHA_GRID}
            chosen = min(errors, key=errors.get)
        else:
            chosen = float(alpha)
        alphas[group.activation] = chosen
        scales[group.activation] = smoothing_scales(act_max, w_max, chosen)
    manager = PassManager([SmoothQuantPass(groups, scales)], verify=verify,
                          verify_options=VerifyOptions(feeds=list(feeds[:2]) or None))
    return SmoothingResult(manager(model).model, alphas, len(groups))


__all__ = ["ALPHA_GRID", "SmoothGroup", "SmoothingResult", "smooth"]
