"""Quantization arithmetic (pure numpy).

Affine:     q = clamp(round(x / s) + z, qmin, qmax),   x ~ s * (q - z)
Asymmetric: s = (hi - lo) / (qmax - qmin),  z = round(qmin - lo / s)        (lo <= 0 <= hi)
Symmetric:  s = max(|lo|, |hi|) / 127,      z = 0                            (int8, range +-127)
Weights:    symmetric, codes in +-127: int8 with z = 0, or uint8 with z = 128 (same values) for CPUs
            whose u8 x s8 kernels saturate (their u8 x u8 kernels do not)
Bias:       s_b = s_x * s_w (per output channel), z_b = 0, stored as int32
"""

from __future__ import annotations

import numpy as np

from qcompile.quant.dtypes import limits
from qcompile.quant.spec import QParams

_EPS = np.float32(1e-12)


def activation_qparams(lo: float, hi: float, dtype: str = "uint8", symmetric: bool = False) -> QParams:
    """Per-tensor parameters for an activation range [lo, hi] (which is widened to contain 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = limits(dtype)
    if symmetric:
        bound = max(abs(lo), abs(hi))
        if dtype == "uint8":
            scale = bound * 2 / (qmax - qmin)
            zero = 128
        else:
            scale = bound / 127.0
            zero = 0
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = int(round(qmin - lo / scale)) if scale > 0 else 0
        zero = int(np.clip(zero, qmin, qmax))
    scale = np.float32(scale if scale > 0 else 1.0)
    return QParams(np.array(scale, dtype=np.float32), np.array(zero, dtype=np.dtype(dtype)), dtype)


def quantize_weight(w: np.ndarray, axis: int | None, dtype: str = "int8") -> tuple[np.ndarray, QParams]:
    """Symmetric 8-bit (codes +-127) per channel along ``axis`` (or per tensor); ``dtype`` uint8
    stores the same codes shifted by the zero point 128."""
    return weight_storage(*_symmetric_int8(np.asarray(w, dtype=np.float32), axis), dtype)


def weight_storage(q: np.ndarray, qp: QParams, dtype: str) -> tuple[np.ndarray, QParams]:
    """Symmetric int8 codes as stored: int8 as they are, uint8 shifted by the zero point 128."""
    if dtype == "int8":
        return q, qp
    shifted = (q.astype(np.int16) + 128).astype(np.uint8)
    return shifted, QParams(qp.scale, np.full(qp.zero_point.shape, 128, dtype=np.uint8), "uint8", qp.axis)


def _symmetric_int8(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, QParams]:
    if axis is None:
        bound = max(float(w.max()), -float(w.min())) if w.size else 0.0
        scale = np.array(bound / 127.0 if bound > 0 else 1.0, dtype=np.float32)
        return _codes(w, scale), QParams(scale, np.array(0, dtype=np.int8), "int8")
    others = tuple(i for i in range(w.ndim) if i != axis)
    bound = np.maximum(w.max(axis=others), -w.min(axis=others))  # |w| max without an |w| copy
    scale = np.where(bound > 0, bound / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    return _codes(w, scale.reshape(shape)), QParams(scale, np.zeros(scale.shape, dtype=np.int8), "int8", axis)


#: Bytes of float temporary per chunk in :func:`_codes` (a 154 MB LM head needs no 154 MB copy).
_CHUNK_BYTES = 16 * 1024 * 1024


def _codes(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """round(w / scale) clipped to +-127, as int8, a chunk of leading-axis slices at a time."""
    out = np.empty(w.shape, dtype=np.int8)
    if w.ndim == 0 or w.size == 0:
        out[...] = np.clip(np.round(w / scale), -127, 127)
        return out
    step = max(1, _CHUNK_BYTES // max(1, w[0].size * 4))
    per_row = scale.ndim > 0 and scale.shape[0] > 1  # per-channel along axis 0
    for start in range(0, w.shape[0], step):
        rows = slice(start, start + step)
        q = w[rows] / (scale[rows] if per_row else scale)
        np.round(q, out=q)
        np.clip(q, -127, 127, out=q)
        out[rows] = q
    return out


def quantize_bias(b: np.ndarray, activation_scale: np.ndarray, weight_scale: np.ndarray) -> tuple[np.ndarray, QParams]:
    """INT32 bias with scale s_x * s_w per output channel."""
    scale = (np.float32(activation_scale) * np.asarray(weight_scale, dtype=np.float32)).astype(np.float32)
    scale = np.maximum(scale, _EPS)
    q = np.clip(np.round(np.asarray(b, dtype=np.float64) / scale), -(2**31), 2**31 - 1).astype(np.int32)
    axis = 0 if scale.ndim else None
    if scale.ndim == 0 and q.ndim == 1:
        scale = np.full(q.shape, scale, dtype=np.float32)
        axis = 0
    return q, QParams(scale, np.zeros(scale.shape, dtype=np.int32), "int32", axis)


def fake_quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """x -> dequantize(quantize(x)) with ``qp`` (numpy reference of Q/DQ)."""
    qmin, qmax = limits(qp.dtype)
    scale, zero = qp.scale.astype(np.float32), qp.zero_point.astype(np.float64)
    if qp.axis is not None:
        shape = [1] * x.ndim
        shape[qp.axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    q = np.clip(np.round(x / scale) + zero, qmin, qmax)
    return ((q - zero) * scale).astype(np.float32)


def weight_codes(cached: dict[str, tuple[np.ndarray, QParams]] | None = None):
    """A ``weight_codes(name, w, axis, dtype)`` function for the Q/DQ lowering: codes computed while
    measuring sensitivity (``cached``, int8, each handed out once) where their axis matches, else
    computed here."""
    cached = {} if cached is None else cached

    def codes(name: str, w: np.ndarray, axis: int | None, dtype: str) -> tuple[np.ndarray, QParams]:
        hit = cached.pop(name, None)
        if hit is not None and hit[1].dtype == "int8" and hit[1].axis == axis:
            return weight_storage(*hit, dtype)
        return quantize_weight(w, axis, dtype)

    return codes


def union_ranges(groups: list[list[str]], ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Per tensor, the union [min lo, max hi] over the scale group it belongs to (groups may overlap:
    they are merged transitively); a tensor in no group keeps its own range."""
    parent = {name: name for name in ranges}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for group in groups:
        members = [m for m in group if m in parent]
        for other in members[1:]:
            parent[find(other)] = find(members[0])
    union: dict[str, tuple[float, float]] = {}
    for name, (lo, hi) in ranges.items():
        root = find(name)
        u = union.get(root, (lo, hi))
        union[root] = (min(u[0], lo), max(u[1], hi))
    return {name: union[find(name)] for name in ranges}
