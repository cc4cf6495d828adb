"""GPTQ (Frantar et al., 2023): block-wise weight quantization that corrects each row's rounding
error with the rows not yet quantized, using the layer-input Hessian H = X^T X from calibration.

For W [K, N] (rows = input channels), with U the upper Cholesky factor of H^-1 (dampened):

    for each row i (in blocks of ``block_size``; a block's scales come from its rows at block start):
        q_i  = quantize(w_i)
        e_i  = (w_i - q_i) / U[i, i]
        w_j -= U[i, j] e_i          for every later row j > i

which minimises ||X W - X Q||^2 greedily, instead of ||W - Q||^2 as round-to-nearest does.
Updates inside a block are row by row; the rest of the matrix is updated once per block.
"""

from __future__ import annotations

import numpy as np

from qcompile.passes.weight_only import BlockQuant, block_params, quantize_codes


def gptq(w: np.ndarray, hessian: np.ndarray, bits: int, block_size: int, symmetric: bool,
         damp: float = 0.01) -> BlockQuant:
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
    h[np.diag_indices(kp)] += damp * float(np.mean(np.diag(h)))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor of H^-1
    codes = np.zeros((n, blocks_k, block_size), dtype=np.uint8)
    scales = np.zeros((n, blocks_k), dtype=np.float32)
    zeros = np.zeros((n, blocks_k), dtype=np.float32)
    for b in range(blocks_k):
        start, end = b * block_size, (b + 1) * block_size
        scale, zero = block_params(weights[start:end].T.astype(np.float32), bits, symmetric)  # per column
        scales[:, b], zeros[:, b] = scale, zero
        errors = np.zeros((block_size, n))
        for i in range(start, end):
            row = weights[i]
            c = quantize_codes(row[:, None].astype(np.float32), scale, zero, bits)[:, 0]
            codes[:, b, i - start] = c
            deq = (c.astype(np.float64) - zero) * scale
            err = (row - deq) / u[i, i]
            errors[i - start] = err
            weights[i + 1 : end] -= np.outer(u[i, i + 1 : end], err)
        weights[end:] -= u[start:end, end:].T @ errors
    return BlockQuant(codes, scales, zeros.astype(np.uint8), k, bits, symmetric)
