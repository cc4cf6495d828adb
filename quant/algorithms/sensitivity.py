"""Per-node INT8 sensitivity: the output SQNR of y = x W with x and W quantize-dequantized.

    SQNR = 10 log10( sum y^2 / sum (y - fq(x) fq(W))^2 )      in dB

fq(W) is applied as codes (int8, or FP8 E4M3 when x is FP8) times per-channel scales; on a
``fraction`` of the output columns (evenly spaced) when every column would cost too much.
28 dB is about 4 % relative L2 error.
"""

from __future__ import annotations

import math

import numpy as np

from qcompile.quant.qparams import fake_quantize, quantize_weight
from qcompile.quant.spec import QParams


def output_sqnr(x: np.ndarray, w: np.ndarray, x_params: QParams, axis: int | None,
                fraction: float = 1.0) -> tuple[float, tuple[np.ndarray, QParams]]:
    """y = x W (W [K, N]) against fq(x) fq(W) on ``fraction`` of the output columns; returns the
    SQNR in dB and W's (codes, parameters) along ``axis`` for all columns."""
    codes, wq = quantize_weight(w, axis, "float8e4m3fn" if x_params.dtype == "float8e4m3fn" else "int8")
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
