"""GPTQ (Frantar et al., 2023): block-wise weight quantization that corrects each row's rounding
error with the rows not yet quantized, using the layer-input Hessian H = X^T X from calibration.

For W [K, N] (rows = input channels), with U the upper Cholesky factor of H^-1 (dampened):

    for each row i (in chunks of ``block_size`` for lazy batch updates):
        q_i  = quantize(w_i)               with the scales of the block row i belongs to
        e_i  = (w_i - q_i) / U[i, i]
        w_j -= U[i, j] e_i                 for every later row j

which minimises ||X W - X Q||^2 greedily, instead of ||W - Q||^2 as round-to-nearest does.

``act_order``: rows are visited by decreasing H[i, i] (the most active input channels first, while
the most rows remain to absorb their error); block scales are then fixed up front from the
original weights ("static groups"), so the stored layout stays plain blocks of consecutive rows.
Without it, a block's scales come from its (already updated) rows when the block starts.
``search``: each block's range is shrunk where that lowers its diag(H)-weighted rounding error.
"""

from __future__ import annotations

import numpy as np

from qcompile.quant.algorithms.rtn import block_params, quantize_codes, searched_block_params
from qcompile.quant.spec import BlockCodes


def gptq(w: np.ndarray, hessian: np.ndarray, bits: int, block_size: int, symmetric: bool,
         damp: float = 0.01, act_order: bool = True, search: bool = True) -> BlockCodes:
    """GPTQ codes for W [K, N] given H [K, K] (K a multiple of block_size is not required)."""
    k, n = w.shape
    blocks_k = -(-k // block_size)
    kp = blocks_k * block_size
    weights = np.zeros((kp, n), dtype=np.float64)
    weights[:k] = w
    h = np.zeros((kp, kp), dtype=np.float64)
    h[:k, :k] = hessian
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    weights[dead, :] = 0.0
    importance = np.diag(h).copy()

    def params(rows: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        block = rows.T.astype(np.float32)  # [N, block]
        if search:
            return searched_block_params(block, bits, symmetric, importance[start : start + block_size])
        return block_params(block, bits, symmetric)

    scales = np.zeros((n, blocks_k), dtype=np.float32)
    zeros = np.zeros((n, blocks_k), dtype=np.float32)
    if act_order:
        for b in range(blocks_k):
            scales[:, b], zeros[:, b] = params(weights[b * block_size : (b + 1) * block_size], b * block_size)
    order = np.argsort(-importance, kind="stable") if act_order else np.arange(kp)
    weights, h = weights[order], h[np.ix_(order, order)]
    h[np.diag_indices(kp)] += damp * float(np.mean(np.diag(h)))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor of H^-1
    codes = np.zeros((n, blocks_k, block_size), dtype=np.uint8)
    for start in range(0, kp, block_size):
        end = start + block_size
        if not act_order:  # block b = chunk b: scales from the rows as updated so far
            b = start // block_size
            scales[:, b], zeros[:, b] = params(weights[start:end], start)
        errors = np.zeros((block_size, n))
        for i in range(start, end):
            b, offset = divmod(int(order[i]), block_size)
            row = weights[i]
            c = quantize_codes(row[:, None].astype(np.float32), scales[:, b], zeros[:, b], bits)[:, 0]
            codes[:, b, offset] = c
            deq = (c.astype(np.float64) - zeros[:, b]) * scales[:, b]
            err = (row - deq) / u[i, i]
            errors[i - start] = err
            weights[i + 1 : end] -= np.outer(u[i, i + 1 : end], err)
        weights[end:] -= u[start:end, end:].T @ errors
    return BlockCodes(codes, scales, zeros.astype(np.uint8), k, bits, symmetric)
