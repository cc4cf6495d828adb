"""Round-to-nearest block quantization of a weight W [K, N] (blocks of ``block_size`` rows along K).

    symmetric  (GGUF Q4_0 style):  d = v / -2^(b-1),  v the block's value of largest |.|;
                                    code = clamp(round(w / d), -2^(b-1), 2^(b-1) - 1) + 2^(b-1),  zp = 2^(b-1)
    asymmetric:                    d = (max - min) / (2^b - 1),  zp = clamp(round(-min / d), 0, 2^b - 1),
                                    code = clamp(round(w / d) + zp, 0, 2^b - 1)
    dequantised:                   w ~ d * (code - zp)

With an importance weight per row (E[x_k^2], diag H) each block's range is searched over shrink
factors (clipping outliers) to minimise the importance-weighted squared error (AWQ's clipping step).
"""

from __future__ import annotations

import numpy as np

from qcompile.quant.spec import BlockCodes


def block_params(blocks: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) per block; ``blocks`` is [..., block]."""
    half = 2 ** (bits - 1)
    if symmetric:
        idx = np.argmax(np.abs(blocks), axis=-1)
        extreme = np.take_along_axis(blocks, idx[..., None], axis=-1)[..., 0]
        scale = extreme / -half
        zero = np.full(scale.shape, half, dtype=np.float32)
    else:
        lo = np.minimum(blocks.min(axis=-1), 0.0)
        hi = np.maximum(blocks.max(axis=-1), 0.0)
        scale = (hi - lo) / (2**bits - 1)
        safe = np.where(scale == 0, 1.0, scale)
        zero = np.clip(np.round(-lo / safe), 0, 2**bits - 1).astype(np.float32)
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    return scale, zero


def quantize_codes(blocks: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    return np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, 2**bits - 1).astype(np.uint8)


#: Range shrink factors tried by :func:`searched_block_params` (1.0 is plain RTN's range).
SHRINK_GRID = tuple(np.round(np.arange(1.0, 0.59, -0.025), 3))


def searched_block_params(blocks: np.ndarray, bits: int, symmetric: bool,
                          importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Block parameters whose range is shrunk (clipping outliers) where that lowers the block's
    squared rounding error, weighted per element by ``importance`` (e.g. diag(H), [block])."""
    weight = np.ones(blocks.shape[-1]) if importance is None else importance
    best_scale, best_zero = block_params(blocks, bits, symmetric)
    best_err = np.full(best_scale.shape, np.inf)
    for p in SHRINK_GRID:
        scale, zero = block_params(blocks * np.float32(p), bits, symmetric)
        deq = (quantize_codes(blocks, scale, zero, bits).astype(np.float32) - zero[..., None]) * scale[..., None]
        err = ((blocks - deq) ** 2 * weight).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale, best_zero = np.where(better, scale, best_scale), np.where(better, zero, best_zero)
    return best_scale.astype(np.float32), best_zero.astype(np.float32)


def rtn(w: np.ndarray, bits: int, block_size: int, symmetric: bool, importance: np.ndarray | None = None) -> BlockCodes:
    """Round-to-nearest block quantization of W [K, N]. With ``importance`` ([K], e.g. E[x_k^2] of
    the input), each block's range is searched (:func:`searched_block_params`) to minimise the
    importance-weighted rounding and clipping error instead of spanning the block's extremes."""
    k, n = w.shape
    blocks_k = -(-k // block_size)
    padded = np.zeros((blocks_k * block_size, n), dtype=np.float32)
    padded[:k] = w
    blocks = padded.T.reshape(n, blocks_k, block_size)
    if importance is None:
        scale, zero = block_params(blocks, bits, symmetric)
    else:
        weight = np.zeros(blocks_k * block_size)
        weight[:k] = importance
        scale, zero = searched_block_params(blocks, bits, symmetric, weight.reshape(blocks_k, block_size))
    return BlockCodes(quantize_codes(blocks, scale, zero, bits), scale, zero.astype(np.uint8), k, bits, symmetric)


def block_codes(bits: int, block_size: int, symmetric: bool, precomputed: dict[str, BlockCodes] | None = None):
    """A ``codes(kind, name, w)`` function for the weight-only lowering: ``precomputed`` codes
    (GPTQ, AWQ; each handed out once) where given, else RTN; embedding tables always symmetric."""
    precomputed = {} if precomputed is None else precomputed

    def codes(kind: str, name: str, w: np.ndarray, weight_bits: int | None = None,
              weight_block: int | None = None) -> BlockCodes:
        if kind == "matmul" and name in precomputed:
            return precomputed.pop(name)
        return rtn(w, weight_bits or bits, weight_block or block_size, symmetric if kind == "matmul" else True)

    return codes
