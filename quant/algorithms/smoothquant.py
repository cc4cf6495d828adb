"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights.

For an activation X [.., K] feeding weights W_i [K, N_i], per input channel j:

    s_j = max|X_j|^alpha / max_i max_n |W_i[j, n]|^(1 - alpha)
    Y_i = X W_i = (X diag(1/s)) (diag(s) W_i)                    (folded by passes/quant/smooth_fold.py)

alpha "auto": per group, the alpha of ALPHA_GRID minimising the group's INT8 output error

    sum_i || X W_i - fq(X / s) fq(diag(s) W_i) ||^2

with fq the target's quantization (per-tensor activations over the range the calibration method
would pick for X / s, per-channel s8 weights).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qcompile.quant.algorithms.grid import argmin
from qcompile.quant.observers import Method, make_observer
from qcompile.quant.qparams import activation_qparams, fake_quantize, quantize_weight

ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
_MIN_SCALE, _MAX_SCALE = 1e-5, 1e5


def smoothing_scales(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), clipped to a safe range (1 where a channel is all zero)."""
    a = np.maximum(np.asarray(act_absmax, dtype=np.float64), 0.0)
    w = np.maximum(np.asarray(weight_absmax, dtype=np.float64), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(a, alpha) / np.power(w, 1.0 - alpha)
    s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
    return np.clip(s, _MIN_SCALE, _MAX_SCALE).astype(np.float32)


def group_error(x: np.ndarray, weights: Sequence[np.ndarray], s: np.ndarray, method: Method, dtype: str,
                symmetric: bool) -> float:
    """sum_i || x W_i - fq(x / s) fq(diag(s) W_i) ||^2 (weights as [K, N])."""
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


def search_alpha(x: np.ndarray, weights: Sequence[np.ndarray], act_absmax: np.ndarray, weight_absmax: np.ndarray,
                 method: Method, dtype: str, symmetric: bool) -> float:
    """The alpha of :data:`ALPHA_GRID` with the least :func:`group_error` on the rows ``x``."""
    return argmin(ALPHA_GRID, lambda a: group_error(x, weights, smoothing_scales(act_absmax, weight_absmax, a),
                                                    method, dtype, symmetric))
