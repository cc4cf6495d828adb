"""AWQ (Lin et al., 2024): activation-aware channel scales for block-wise weight-only quantization.

    s_j = mean|X_j|^alpha, normalised so that sqrt(max s * min s) = 1
    Y_i = X W_i = (X diag(1/s)) (diag(s) W_i)       1/s folded into X's producer, s into each W_i

alpha in ALPHA_GRID = {0, 1/8, ..., 1} minimises the group's output error with RTN block weights

    sum_i || X W_i - (X / s) Q(diag(s) W_i) ||^2

on sampled rows; alpha 0 is plain RTN, so the search never does worse there. Clipping: each weight's
block ranges are then searched against the error weighted by its input's E[x_k^2] / s_k^2.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qcompile.quant.algorithms.grid import argmin
from qcompile.quant.algorithms.rtn import rtn

ALPHA_GRID = tuple(float(a) for a in np.linspace(0.0, 1.0, 9))
#: Token rows (evenly spaced over the search feeds) on which each alpha is scored.
SEARCH_ROWS = 512
_MIN_SCALE, _MAX_SCALE = 1e-4, 1e4


def awq_scales(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """s = mean|X|^alpha, normalised to a geometric mid-range of 1, clipped to a safe range."""
    s = np.power(np.maximum(np.asarray(mean_abs, dtype=np.float64), 1e-8), alpha)
    s = s / np.sqrt(s.max() * s.min())
    return np.clip(s, _MIN_SCALE, _MAX_SCALE).astype(np.float32)


def group_error(x: np.ndarray, weights: Sequence[np.ndarray], s: np.ndarray, bits: int, block_size: int,
                symmetric: bool) -> float:
    """sum_i || x W_i - (x / s) Q(diag(s) W_i) ||^2 with Q the RTN block quantization."""
    xs = x / s
    err = 0.0
    for w in weights:
        deq = rtn(w * s[:, None], bits, block_size, symmetric).dequantize()
        err += float(np.sum(np.square(x @ w - xs @ deq, dtype=np.float64)))
    return err


def search_alpha(x: np.ndarray, weights: Sequence[np.ndarray], mean_abs: np.ndarray, bits: int, block_size: int,
                 symmetric: bool) -> float:
    """The alpha of :data:`ALPHA_GRID` with the least :func:`group_error` on (at most SEARCH_ROWS of) ``x``."""
    if len(x) > SEARCH_ROWS:
        x = x[np.linspace(0, len(x) - 1, SEARCH_ROWS).round().astype(np.int64)]
    return argmin(ALPHA_GRID, lambda a: group_error(x, weights, awq_scales(mean_abs, a), bits, block_size, symmetric))


def clipping_importance(mean_square: np.ndarray, s: np.ndarray | None) -> np.ndarray:
    """E[x_k^2] of the scaled input X / s: the weight of row k in the clipping search."""
    return mean_square / (1.0 if s is None else np.square(s.astype(np.float64)))
